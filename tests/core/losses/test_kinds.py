"""core/losses/kinds.py: every loss has one of a few kinds, each kind names everything that follows
from it, and a new loss of an existing kind needs nothing but its registration."""

import dataclasses
import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import PAIRS as PAIR_ROWS
from conftest import write_jsonl
from preftune.config import load_config
from preftune.core.losses import KINDS, LOSSES, Kind, LossOutput, LossSpec, register_loss, setting
from preftune.core.losses.kinds import PAIRS
from preftune.utils.errors import ConfigError


def test_the_spec_holds_a_kind_not_flags():
    """The kind travels as one object: the five booleans it replaced are gone."""
    names = [f.name for f in dataclasses.fields(LossSpec)]
    assert names == ["name", "impl", "kind", "needs_reference", "params", "needs_lengths", "summary", "uses", "settings",
                     "estimator", "inputs", "state"]
    assert all(isinstance(spec.kind, Kind) and KINDS[spec.kind.name] is spec.kind for spec in LOSSES.values())
    assert sorted(KINDS) == ["demonstrations", "pairs", "policy_gradient", "reward_model", "rollouts", "unpaired"]
    # an estimator names a function of core/losses/ppo.py, and only policy-gradient losses have one
    from preftune.core.losses.ppo import ESTIMATORS
    assert all((spec.estimator in ESTIMATORS) == (spec.kind.name == "policy_gradient") for spec in LOSSES.values())


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_hook_a_kind_names_exists(name):
    kind = KINDS[name]
    params = list(inspect.signature(kind.forward).parameters)
    assert params[:7] == ["model", "reference", "spec", "batch", "kwargs", "device", "bf16"]
    assert list(inspect.signature(kind.metrics).parameters) == ["parts"]
    runner = inspect.signature(kind.run).parameters
    assert "resume" in runner and "allow_config_change" in runner
    assert kind.layout in ("measured", "padded") and kind.model in ("causal_lm", "score_head")
    assert kind.margins in ("beta", "scores")
    assert kind.pair_scorer == "" or LOSSES[kind.pair_scorer].kind is PAIRS


def test_a_loss_needs_a_registered_kind():
    stray = dataclasses.replace(PAIRS, name="critic")
    with pytest.raises(ValueError, match="not a registered kind"):
        register_loss("stray", LOSSES["sigmoid"].fn, kind=stray, needs_reference=True, summary="x")
    assert "stray" not in LOSSES


def _squared_hinge(pc, pr, rc, rr, *, beta):
    """A loss no registry has: relu(1 - beta * Delta)^2, written only for this test."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    losses = F.relu(1 - (chosen - rejected)) ** 2
    return LossOutput(losses, chosen.detach(), rejected.detach())


def test_a_new_loss_of_an_existing_kind_is_its_registration_only(tmp_path, tiny_model_dir):
    """The worked example of docs/extending.md: register, then name it in a config; the loop,
    evaluation, metrics and resume route come from its kind, with no other file touched."""
    from preftune.training.train import train

    register_loss("squared_hinge", _squared_hinge, kind=PAIRS, needs_reference=True,
                  summary="squared hinge relu(1 - beta * Delta)^2 (a test loss)")
    try:
        data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}",
                                 f"data.eval_path={data}", f"run.output_dir={tmp_path / 'run'}",
                                 "data.max_length=64", "data.max_prompt_length=32", "train.lr=1e-2",
                                 "model.lora_r=4", "model.lora_alpha=8", "loss.name=squared_hinge",
                                 "train.max_steps=2", "train.batch_size=4"])
        result = train(cfg)
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert "rewards/margins" in rows[0] and "logratios/chosen" in rows[0]  # the pairs kind's metrics
        assert 0.0 <= result.summary["eval"]["accuracy/implicit_reward"] <= 1.0
        # a setting the new loss does not read is refused like any other loss's
        with pytest.raises(ConfigError, match="does not use it"):
            load_config(None, [f"data.train_path={data}", "loss.name=squared_hinge", "loss.simpo_gamma=1.0"])
    finally:
        del LOSSES["squared_hinge"]


def test_loss_config_is_generated_from_the_settings_next_to_each_loss():
    """Each setting once, its help naming the losses that read it, its range checked when a config
    loads; what a loss's function receives (params) and what its source reads (uses) come from it."""
    from preftune.config import LossConfig

    names = [f.name for f in dataclasses.fields(LossConfig)]
    assert names[:3] == ["name", "beta", "mix"] and len(names) == len(set(names))
    declared = {f.name for s in LOSSES.values() if s.settings for f in dataclasses.fields(s.settings)}
    assert set(names[3:]) == declared
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(LossConfig)}
    assert help_of["label_smoothing"].startswith("cdpo/robust/aot/aot_unpaired: ")  # one declaration, four readers
    assert LOSSES["kto"].params == ("beta", "desirable_weight", "undesirable_weight")
    assert LOSSES["kto"].uses == ("kto_auto_weights",) and LOSSES["grpo"].params[0] == "clip_epsilon"
    for key, value, problem in (("loss.clip_epsilon", "1.0", "must be in (0, 1)"),
                                ("loss.label_smoothing", "0.5", "must be in [0, 0.5)"),
                                ("loss.desirable_weight", "0", "must be > 0"), ("loss.rm_margin", "-1", "must be >= 0"),
                                ("loss.kl_coef", "-0.5", "must be >= 0")):
        with pytest.raises(ConfigError, match=f"{key}: {problem}".replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            load_config(None, [f"{key}={value}"])


def test_a_setting_declared_twice_differently_is_refused():
    from preftune.config import _loss_config

    @dataclasses.dataclass(frozen=True)
    class Clash:
        simpo_gamma: float = setting(0.9, "another default than simpo's 0.5")

    register_loss("clash", LOSSES["simpo"].fn, kind=PAIRS, needs_reference=False, settings=Clash, summary="x")
    try:
        with pytest.raises(ValueError, match="declared twice"):
            _loss_config()
    finally:
        del LOSSES["clash"]
