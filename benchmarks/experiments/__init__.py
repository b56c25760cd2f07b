"""Experiments on the default model (each `python -m benchmarks.experiments.<name>`) and hh_cli, what they share."""
