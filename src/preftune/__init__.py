"""preftune: align language models with preference data (DPO and its family)."""

import importlib

from .version import __version__

__all__ = ["__version__", "Config", "load_config", "LOSSES", "train", "RunResult"]

# PEP 562: `import preftune` (and the `preftune` command, which imports preftune.cli) stays light;
# train (torch, transformers) loads when one of these is first used
_LAZY = {"Config": "config", "load_config": "config", "LOSSES": "losses", "train": "train", "RunResult": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
