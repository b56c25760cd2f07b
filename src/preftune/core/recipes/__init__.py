"""Per-method starting recipes: `<method>.yaml` beside this file.

Each file is a normal preftune config (sections loss/train/model...) that runs as it is:
`preftune train -c recipe:ipo data.train_path=...` (`recipe:NAME` is resolved here by
config.load_config). Its top-level `recipe:` block is metadata that load_config skips:

  tuned       true only when the settings were picked by a documented search on held-out data
  tuned_on    what the settings were chosen or measured on (data, model, budget)
  confidence  high | medium | low, and why (what `preftune advise` repeats to the user)
  evidence    the measured runs behind the settings: command, data, figures (accuracies with
              their base, KL, health flags); an untuned recipe lists what was measured so far
  budget      how much optimisation the recipe wants on a file of any size (the form:
              benchmarks/quality/protocol.py); `preftune advise` prints it, train does not apply it

Until benchmarks/quality/ has searched them, the recipes are the settings the project's
measured runs used (tuned: false), and say so.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ...utils.errors import ConfigError

__all__ = ["RECIPE_DIR", "RECIPES", "Recipe", "load_recipe", "recipe_path", "recipe_name", "PREFIX"]

RECIPE_DIR = Path(__file__).resolve().parent
RECIPES = tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))  # a recipe is its file: add one, it is listed
PREFIX = "recipe:"


@dataclass
class Recipe:
    name: str
    settings: dict  # section -> {key: value}, exactly what load_config applies
    meta: dict  # the `recipe:` block
    path: Path

    def get(self, key: str, default=None):
        """A dotted setting (`train.lr`) of the recipe, or `default` when it does not set it."""
        section, _, name = key.partition(".")
        return self.settings.get(section, {}).get(name, default)

    def overrides(self) -> list[str]:
        """The recipe as `section.key=value` words (JSON values: YAML reads them back unchanged)."""
        return [f"{section}.{key}={json.dumps(value)}" for section, values in self.settings.items()
                for key, value in values.items()]


def recipe_path(ref: str) -> Path:
    """`recipe:NAME` (or NAME) -> the file; an unknown name is a one-line error listing the known ones."""
    name = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    if name not in RECIPES:
        raise ConfigError("command line", ref, f"unknown recipe; known: {', '.join(RECIPES)}")
    return RECIPE_DIR / f"{name}.yaml"


def recipe_name(loss: str, mix: list) -> str | None:
    """The recipe a loss setting runs with by default: the loss's own, `rpo` for the DPO + SFT mix,
    None for losses without one (robust, hinge, sft, bt, grpo, other mixes)."""
    if mix:
        terms = sorted(t[0] for t in mix if isinstance(t, list) and t)
        return "rpo" if terms == ["sft", "sigmoid"] else None
    return loss if loss in RECIPES else None


def load_recipe(name: str) -> Recipe:
    """A packaged recipe (a fresh copy: callers may change it). Every load_config reads one for
    its defaults, so the parsed files are kept; they are this package's own, read without the
    size cap that user files get (PREFTUNE_MAX_FILE_BYTES must not break config defaults)."""
    return copy.deepcopy(_parsed(recipe_path(name)))


@functools.cache
def _parsed(path: Path) -> Recipe:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    meta = data.pop("recipe", {})
    return Recipe(name=path.stem, settings=data, meta=meta, path=path)
