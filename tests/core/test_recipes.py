"""recipes/: every recipe is a valid config that runs as `-c recipe:NAME`, and says what backs it."""

import pytest

from preftune.config import load_config
from preftune.core.losses import LOSSES
from preftune.core.recipes import RECIPES, load_recipe
from preftune.utils.errors import ConfigError


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_loads_as_a_config_and_as_overrides(name):
    cfg = load_config(f"recipe:{name}")
    r = load_recipe(name)
    again = load_config(None, r.overrides())
    assert (cfg.loss.name, cfg.loss.mix, cfg.loss.beta, cfg.train.lr) == \
        (again.loss.name, again.loss.mix, again.loss.beta, again.train.lr)
    assert cfg.train.lr == r.get("train.lr") > 0
    assert name == "rpo" or cfg.loss.name == name and name in LOSSES
    meta = r.meta
    assert isinstance(meta.get("tuned"), bool) and meta.get("tuned_on") and meta.get("confidence")
    assert isinstance(meta.get("evidence"), list)
    if not meta["tuned"]:
        assert "low" in meta["confidence"]  # an unsearched recipe never claims more


def test_recipe_metadata_is_not_a_setting_and_user_overrides_win():
    cfg = load_config("recipe:ipo", ["train.lr=1e-5", "loss.beta=0.5"])
    assert cfg.train.lr == 1e-5 and cfg.loss.beta == 0.5 and cfg.loss.name == "ipo"
    assert not hasattr(cfg, "recipe")


def test_unknown_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("recipe:dpo2")
    assert "unknown recipe" in str(err.value) and "sigmoid" in str(err.value)


def test_the_recipe_names_are_the_recipe_files():
    from preftune.core.recipes import RECIPE_DIR, RECIPES

    assert sorted(RECIPES) == sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) and "rpo" in RECIPES
