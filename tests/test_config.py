import re
from pathlib import Path

import pytest
import yaml

from preftune.config import config_help, load_config, save_config
from preftune.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_file_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  batch_size: 2\nloss:\n  beta: 0.2\n")
    cfg = load_config(path, ["train.lr=5e-5", "model.lora_target_modules=[q_proj]"])
    assert cfg.train.lr == 5e-5 and cfg.train.batch_size == 2 and cfg.loss.beta == 0.2
    assert cfg.model.lora_target_modules == ["q_proj"] and cfg.train.epochs == 1


@pytest.mark.parametrize("text, key, problem", [
    ("train:\n  lrr: 1\n", "train.lrr", "unknown key (did you mean 'lr'?)"),
    ("trian:\n  lr: 1\n", "trian", "unknown section (did you mean 'train'?)"),
    ("loss:\n  beta: -0.1\n", "loss.beta", "must be > 0"),
    ("loss:\n  beta: 0\n", "loss.beta", "must be > 0"),
    ("train:\n  lr: .nan\n", "train.lr", "must be a number in (0, 3.4e+38]"),
    ("train:\n  batch_size: two\n", "train.batch_size", "expected int, got str"),
    ("loss:\n  name: sigmod\n", "loss.name", "did you mean 'sigmoid'?"),
    ("data:\n  max_length: 64\n  max_prompt_length: 64\n", "data.max_prompt_length", "must be in [1,"),
    ("loss:\n  name: f_dpo\n  f_divergence_type: kl\n", "loss.f_divergence_type",
     "must be one of reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    ("loss:\n  name: exo_pair\n  exo_epsilon: 0\n", "loss.exo_epsilon", "must be in (0, 0.5)"),
    ("train:\n  autocast_bf16: sometimes\n", "train.autocast_bf16", "must be true, false or auto"),
    ("train:\n  autocast_bf16: 1\n", "train.autocast_bf16", "must be true, false or auto"),
])
def test_bad_files_name_file_and_key(tmp_path, text, key, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert problem in str(info.value)


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError, match=r"^command line: train.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="^command line: loss.beta: must be > 0"):
        load_config(None, ["loss.beta=-1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "data.column_map={q: prompt}"])
    save_config(cfg, tmp_path / "config.yaml", extra={"preftune_version": "0.1.0"})
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["preftune_version"] == "0.1.0" and saved["train"]["seed"] == 42  # defaults included
    assert load_config(tmp_path / "config.yaml") == cfg


def test_newer_saved_version_warns(tmp_path):
    (tmp_path / "c.yaml").write_text("preftune_version: 99.0.0\n")
    with pytest.warns(UserWarning, match="99.0.0"):
        load_config(tmp_path / "c.yaml")


def test_every_shipped_config_validates():
    found = sorted((ROOT / "configs").rglob("*.yaml"))
    ours = [p for p in found if p.parent.name != "accelerate"]
    launch = [p for p in found if p.parent.name == "accelerate"]
    assert (len(ours), len(launch)) == (1, 4), found  # update when adding configs: guards a silent glob miss
    for path in ours:
        load_config(path)
    from accelerate.commands.config.config_args import ClusterConfig

    for path in launch:  # accelerate's own parser accepts every key
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.num_processes == 8 and cfg.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}


def test_help_lists_every_key():
    text = config_help()
    assert "train.lr = 0.0" in text and "the loss's recipe" in text and "loss.beta" in text and text.count("\n") >= 30


def test_lr_default_depends_on_lora_and_dpo_is_sigmoid():
    from preftune.config import load_config
    from preftune.core.recipes import load_recipe

    recipe_lr = load_recipe("sigmoid").get("train.lr")
    assert load_config(None, []).train.lr == recipe_lr != 5e-5  # recipes/sigmoid.yaml, not the generic default
    assert load_config(None, ["model.lora=false"]).train.lr == pytest.approx(recipe_lr / 10)  # full fine-tuning
    assert load_config(None, ["loss.name=robust"]).train.lr == 5e-5  # no recipe: the generic LoRA default
    assert load_config(None, ["model.lora=false", "train.lr=1e-4"]).train.lr == 1e-4
    assert load_config(None, ["loss.name=dpo"]).loss.name == "sigmoid"
    assert load_config(None, ["loss.mix=[[dpo, 1.0], [sft, 0.2]]"]).loss.mix == [["sigmoid", 1.0], ["sft", 0.2]]


def test_unset_loss_settings_come_from_the_loss_recipe_and_set_ones_stay(tmp_path):
    from preftune.config import load_config, save_config
    from preftune.core.recipes import load_recipe

    r = load_recipe("simpo")
    simpo = load_config(None, ["loss.name=simpo"])
    assert (simpo.loss.beta, simpo.loss.simpo_gamma, simpo.train.lr) == (r.get("loss.beta"), r.get("loss.simpo_gamma"),
                                                                         r.get("train.lr"))
    assert simpo.loss.beta >= 1  # SimPO's scale (the paper's 2-2.5), not DPO's 0.1
    assert load_config(None, ["loss.name=simpo", "loss.beta=1"]).loss.beta == 1.0
    assert load_config(None, ["loss.name=cdpo"]).loss.label_smoothing == 0.1
    assert load_config(None, ["loss.name=kto"]).loss.kto_auto_weights is True
    assert load_config(None, ["loss.name=kto", "loss.desirable_weight=1.3"]).loss.kto_auto_weights is False
    assert load_config(None, ["loss.mix=[[sigmoid, 1.0], [sft, 0.2]]"]).train.lr == load_recipe("rpo").get("train.lr")
    assert load_config(None, ["loss.name=sigmoid", "train.batch_size=2"]).train.batch_size == 2
    # a saved run's config sets every key: reloading it never takes a recipe's value
    save_config(load_config(None, ["loss.name=simpo", "loss.beta=0.7", "train.lr=1e-5"]), tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert (again.loss.beta, again.train.lr) == (0.7, 1e-5)


def test_every_pairing_mode_is_accepted_and_nothing_else():
    from preftune.data.pairs import PAIRINGS

    for name in PAIRINGS:
        assert load_config(None, [f"online.pairing={name}"]).online.pairing == name
    with pytest.raises(ConfigError, match="online.pairing"):
        load_config(None, ["online.pairing=best_of_all"])


def test_resume_and_cache_keys_come_from_field_metadata(tmp_path):
    """Changing a `resume=False` setting keeps a checkpoint resumable; anything else does not.
    Changing a `tokens=True` setting changes the reference-cache key; anything else does not."""
    from preftune.config import fields_where
    from preftune.data.refcache import data_settings
    from preftune.training.checkpoint import fingerprint

    class Tok:
        def get_vocab(self):
            return {"a": 0}

    base = load_config(None, [])
    assert set(fields_where(base.train, "resume")) == {f for f in vars(base.train)} - {
        "log_every", "checkpoint_every", "keep_last", "reference_cache", "report_to", "tracker_project",
        "logprob_chunk_tokens"}
    fp = fingerprint(base, Tok())
    moved = load_config(None, ["train.checkpoint_every=5", "data.layout=padded", "data.eval_path=x"])
    assert fingerprint(moved, Tok()) == fp
    assert fingerprint(load_config(None, ["train.seed=1"]), Tok()) != fp
    assert set(data_settings(base.data)) == {"format", "column_map", "max_length", "max_prompt_length", "max_records",
                                             "drop_overlong", "allow_degenerate", "allow_empty_completions",
                                             "hh_as_chat"}
    assert data_settings(load_config(None, ["data.hh_as_chat=true"]).data) != data_settings(base.data)


def test_trackers_are_checked_with_the_config(monkeypatch):
    """A typo used to fail as an internal error after the model loaded (exit 1, an empty run
    directory left), and a tracker whose package is missing trained to the end logging nothing."""
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tensorbord' \(did you mean "
                                          r"'tensorboard'\?\); known: all, aim, tensorboard"):
        load_config(None, ["train.report_to=[tensorbord]"])
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'wandb' is not installed \(pip install 'preftune\[wandb\]'\)"):
        load_config(None, ["train.report_to=[wandb]"])
    assert load_config(None, ["train.report_to=[tensorboard]"]).train.report_to == ["tensorboard"]


@pytest.mark.parametrize("tracker", ["tensorbord", "wandb"])
def test_a_bad_tracker_is_one_line_before_any_run_file(tracker, tmp_path, capsys, monkeypatch):
    from accelerate.utils import imports

    from conftest import PAIRS, write_jsonl
    from preftune.cli import main

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)  # as on a machine without it
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    rc = main(["train", f"data.train_path={data}", f"run.output_dir={tmp_path / 'run'}",
               f"train.report_to=[{tracker}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.report_to" in err[0], err
    assert not (tmp_path / "run").exists()


def test_absurd_learning_rates_are_refused_with_the_config():
    for lr in ("1e300", "1e39", "-1e-4", ".nan", ".inf"):  # 0 means "the recipe's"
        with pytest.raises(ConfigError, match=r"train.lr: must be a number in \(0, 3.4e\+38\]"):
            load_config(None, [f"train.lr={lr}"])


def _other_value(f):
    import dataclasses

    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, str):  # a named choice (f_divergence_type): another valid one
        return next(c for c in f.metadata["bounds"] if c != default)
    if isinstance(default, int):  # a count (dr_grpo_tokens, overlong_buffer): another whole number
        return str(default + 1)
    return str(round(default + 0.1, 4))


def _inapplicable_cases():
    import dataclasses

    from preftune.config import LossConfig
    from preftune.core.losses import LOSSES

    for name, spec in sorted(LOSSES.items()):
        for f in dataclasses.fields(LossConfig):
            if f.name not in ("name", "mix", "beta", *spec.params, *spec.uses):
                yield name, f


@pytest.mark.parametrize("loss,field", list(_inapplicable_cases()), ids=lambda x: getattr(x, "name", x))
def test_a_setting_the_loss_does_not_use_is_refused(loss, field):
    """loss.label_smoothing with ipo, loss.simpo_gamma with sigmoid... trained as if unset (issue 38)."""
    expected = f"command line: loss.{field.name}: '{loss}' does not use it (its settings: "
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, [f"loss.name={loss}", f"loss.{field.name}={_other_value(field)}"])


def test_settings_a_loss_uses_and_saved_configs_still_load(tmp_path):
    from preftune.config import LOSSES

    assert len(list(_inapplicable_cases())) >= 100  # every loss x every setting it does not read
    load_config(None, ["loss.name=cdpo", "loss.label_smoothing=0.2"])
    load_config(None, ["loss.name=kto", "loss.kto_auto_weights=true"])
    load_config(None, ["loss.mix=[[sigmoid, 1.0], [simpo, 0.5]]", "loss.simpo_gamma=1.0"])  # a mix takes its terms'
    for name in LOSSES:  # a saved config holds every key at its resolved value
        saved = tmp_path / f"{name}.yaml"
        save_config(load_config(None, [f"loss.name={name}"]), saved)
        assert load_config(saved).loss.name == name
