"""Offline DPO, iterative DPO and GRPO at matched samples: `python -m benchmarks.experiments.dpo_vs_grpo`."""
