"""SFT then DPO, each stage held out: `python -m benchmarks.experiments.sft_dpo` (see __main__.py)."""
