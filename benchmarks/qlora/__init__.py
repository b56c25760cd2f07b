"""What QLoRA's 4-bit base costs in log-probs and saves in memory: `python -m benchmarks.qlora`."""
