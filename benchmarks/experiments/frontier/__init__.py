"""Reward vs KL frontier on controlled sentiment: `python -m benchmarks.experiments.frontier`."""
