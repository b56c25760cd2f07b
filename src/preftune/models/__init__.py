"""Models: loading (local, zoo, hub, GGUF, QLoRA), sampling, and reward sources that score text."""
