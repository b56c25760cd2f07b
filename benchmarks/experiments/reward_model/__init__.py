"""Reward models beside DPO's implicit reward: `python -m benchmarks.experiments.reward_model`."""
