"""The length-bias trap and its cure: `python -m benchmarks.experiments.length_bias` (see __main__.py)."""
