"""Best-of-N on the sentiment prompts: `python -m benchmarks.experiments.bon` (see __main__.py)."""
