"""preftune: align language models with preference data (DPO and its family)."""

import importlib
import sys
import types

from .version import __version__

__all__ = ["__version__", "Config", "load_config", "LOSSES", "train", "RunResult"]

# PEP 562: `import preftune` (and the `preftune` command, which imports preftune.cli) stays light;
# the rest (torch, transformers) loads when one of these is first used. `train` is the Python API
# (api.train: a Config, or model/tokenizer/datasets objects), as it always was.
_LAZY = {"Config": "config", "load_config": "config", "LOSSES": "losses", "train": "api", "RunResult": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule `preftune.train` sets the package's attribute `train` to that module
    (the import system does it once, on first import); with the names loaded lazily that would hide
    the function `preftune.train`. The module stays in sys.modules (`from preftune.train import ...`)."""

    def __setattr__(self, name, value):
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
