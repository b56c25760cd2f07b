"""Memory per process, one process vs FSDP2 on two: `python -m benchmarks.fsdp` (see __main__.py)."""
