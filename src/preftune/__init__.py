"""preftune: align language models with preference data (DPO and its family)."""

from .config import Config, load_config
from .losses import LOSSES
from .train import RunResult, train
from .version import __version__

__all__ = ["__version__", "Config", "load_config", "LOSSES", "train", "RunResult"]
