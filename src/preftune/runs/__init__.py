"""Run kinds built on the training loop: online and iterative DPO, GRPO, best-of-N, SFT, reward models."""
