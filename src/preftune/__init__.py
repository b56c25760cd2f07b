"""preftune: align language models with preference data (DPO and its family)."""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .losses import LOSSES  # noqa: E402
from .train import RunResult, train  # noqa: E402

__all__ = ["__version__", "Config", "load_config", "LOSSES", "train", "RunResult"]
