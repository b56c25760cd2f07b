"""Models: loading (local, zoo, hub, GGUF, QLoRA), sampling, and reward sources that score text."""

# The reward kinds and the argument each takes. rewards/__init__.py builds REWARD_KINDS from this
# table (a kind without a factory fails at import); it sits here, outside the rewards package, so
# that the CLI's --help reads it without importing torch.
REWARD_SYNTAX = {"sentiment": "sentiment", "arithmetic": "arithmetic", "fn": "fn:module:func", "rm": "rm:DIR",
                 "implicit": "implicit:RUN", "judge": "judge:URL[#model]"}
