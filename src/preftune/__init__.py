"""preftune: align language models with preference data (DPO and its family)."""

import importlib

from .utils.version import __version__

__all__ = ["__version__", "Config", "load_config", "LOSSES", "train", "RunResult"]

# PEP 562: `import preftune` (and the `preftune` command, which imports preftune.cli) stays light;
# the rest (torch, transformers) loads when one of these is first used. `train` is the Python API
# (apps.api.train: a Config, or model/tokenizer/datasets objects).
_LAZY = {"Config": "config", "load_config": "config", "LOSSES": "core.losses", "train": "apps.api",
         "RunResult": "training.train"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
