"""The cost of one training step against pair length: `python -m benchmarks.scaling` (see __main__.py)."""
