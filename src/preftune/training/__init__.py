"""The one training loop, its checkpoints, in-loop evaluation and probes."""
