"""DAPO's sampling side in the GRPO source: dynamic sampling (groups whose rewards are all equal
are dropped and more prompts drawn), its cap, exact resume with it, the soft overlong punishment
and the overlong filter; and every loss of the GRPO family trains through the one loop."""


import pytest

from conftest import interrupt_after_checkpoint, metrics_rows, weights_sha
from preftune.config import load_config
from preftune.runs.online.grpo import run_grpo

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?",
           "The soundtrack was", "My review:"]


def half_constant_reward(prompts, completions):
    """Every completion of a prompt that starts with "The" scores 0.5 (a group with no signal);
    the others score their vowels (`fn:test_grpo_dynamic:half_constant_reward`)."""
    return [0.5 if p.startswith("The") else float(sum(ch in "aeiou" for ch in c)) for p, c in zip(prompts, completions)]


def zero_reward(prompts, completions):
    return [0.0 for _ in completions]


def _args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.name_or_path={model_dir}", f"online.prompts_path={prompts}",
            "online.reward=fn:test_grpo_dynamic:half_constant_reward", "online.max_new_tokens=6",
            "online.samples_per_prompt=4", "online.prompts_per_step=2", "model.lora_r=4", "train.lr=1e-2",
            "train.max_steps=6", "diagnostics.probe_every=0", "data.max_length=64", "data.max_prompt_length=32",
            "loss.name=grpo", *extra]


def _run(tmp_path, model_dir, name, *extra):
    return run_grpo(load_config(None, _args(tmp_path, model_dir, f"run.output_dir={tmp_path / name}", *extra)))


def test_dynamic_sampling_fills_every_batch_with_groups_that_carry_signal(tmp_path, tiny_model_dir):
    """Plain GRPO trains on the equal-reward groups (advantage 0); with dynamic sampling they are
    dropped before the batch is formed, more prompts are drawn, every batch still has 2 groups x 4
    completions, and the share of equal groups among those drawn is logged with the draws used."""
    plain = metrics_rows(_run(tmp_path, tiny_model_dir, "plain").run_dir)
    assert any(r["groups/zero_variance"] > 0 for r in plain) and "online/zero_variance_drawn" not in plain[0]
    rows = metrics_rows(_run(tmp_path, tiny_model_dir, "dyn", "loss.dynamic_sampling=true").run_dir)
    assert all(r["completions"] == 8 and r["groups/zero_variance"] == 0.0 for r in rows)
    assert all(0.0 <= r["online/zero_variance_drawn"] <= 1.0 for r in rows)
    assert any(r["online/zero_variance_drawn"] > 0 for r in rows) and any(r["online/draws"] > 1 for r in rows)
    assert all(r["online/samples"] == 8 * r["online/draws"] for r in rows)


def test_the_cap_trains_on_the_groups_it_has(tmp_path, tiny_model_dir):
    """One draw per batch: a draw with one equal group trains on the other alone (4 completions); a
    draw whose groups are all equal trains on them (advantage 0), as plain GRPO would."""
    rows = metrics_rows(_run(tmp_path, tiny_model_dir, "cap", "loss.dynamic_sampling=true",
                      "loss.dynamic_sampling_max_draws=1").run_dir)
    assert all(r["online/draws"] == 1 for r in rows)
    for r in rows:
        if r["online/zero_variance_drawn"] == 0.5:  # one group of the two dropped
            assert r["completions"] == 4 and r["groups/zero_variance"] == 0.0
        elif r["online/zero_variance_drawn"] == 1.0:  # nothing kept: the draw itself, no signal
            assert r["completions"] == 8 and r["groups/zero_variance"] == 1.0
        else:
            assert r["completions"] == 8
    assert any(r["completions"] == 4 for r in rows), rows  # the seed draws at least one such batch
    everything_equal = metrics_rows(_run(tmp_path, tiny_model_dir, "eq", "loss.dynamic_sampling=true",
                                  "loss.dynamic_sampling_max_draws=3", "online.reward=fn:conftest:constant_reward",
                                  "train.max_steps=2").run_dir)
    assert all(r["online/draws"] == 3 and r["completions"] == 8 and r["groups/zero_variance"] == 1.0
               for r in everything_equal)


def test_dynamic_sampling_interrupted_then_resumed_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    """Each batch's draws are seeded by (batch index, attempt): a resumed run draws, drops and
    keeps exactly what the uninterrupted one did."""
    def cfg(name):
        return load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}",
                                       "loss.dynamic_sampling=true", "train.checkpoint_every=1",
                                       "model.lora_dropout=0.1"))

    full = run_grpo(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_grpo(cfg("cut")))
    resumed = run_grpo(cfg("cut"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000003")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert metrics_rows(resumed.run_dir) == metrics_rows(full.run_dir)


def test_soft_overlong_punishment_and_the_overlong_filter(tmp_path, tiny_model_dir):
    """A reward of 0 for everything, minus the soft overlong punishment over the whole budget
    (buffer = online.max_new_tokens = 6, penalty 1): each completion scores -|y| / 6, so the mean
    reward is minus the mean length over 6. The filter: completions cut off at 6 tokens without an
    EOS are counted and take no part in the loss; when every completion is cut off the loss is 0."""
    rows = metrics_rows(_run(tmp_path, tiny_model_dir, "pun", "online.reward=fn:test_grpo_dynamic:zero_reward",
                      "loss.overlong_buffer=6", "loss.kl_coef=0", "train.max_steps=2").run_dir)
    assert all(r["reward/mean"] == pytest.approx(-r["lengths/completion"] / 6, abs=1e-6) for r in rows)
    rows = metrics_rows(_run(tmp_path, tiny_model_dir, "filt", "loss.overlong_filter=true", "train.max_steps=2").run_dir)
    plain = metrics_rows(_run(tmp_path, tiny_model_dir, "unfiltered", "train.max_steps=2").run_dir)
    # the random tiny model never samples its EOS in 6 tokens: every completion is cut off, none trains
    assert all(r["completions/truncated"] == 1.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)
    assert plain[0]["reward/mean"] == rows[0]["reward/mean"] and plain[0]["grad_norm"] > 0  # same samples
    assert "completions/truncated" not in plain[0]


def test_the_overlong_filter_marks_cut_off_completions_and_the_forward_drops_their_tokens(monkeypatch):
    """Rows cut off at online.max_new_tokens = 3 without EOS (id 2) are marked; the rollout forward
    hands the loss the completion mask times the rows it keeps, and logs the share cut off."""
    import dataclasses

    import torch

    from preftune.core import step
    from preftune.core.losses import LOSSES
    from preftune.runs.online.grpo import GRPOSource

    source = GRPOSource.__new__(GRPOSource)
    source.cfg = load_config(None, ["online.max_new_tokens=3", "train.max_steps=1"])
    source.tokenizer = type("Tok", (), {"eos_token_id": 2})()
    rows = [([1], [5, 6, 7]), ([1], [5, 6, 2]), ([1], [5, 2]), ([1], [5, 6])]
    assert source._truncated(rows).tolist() == [1.0, 0.0, 0.0, 0.0]

    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    monkeypatch.setattr(step, "completion_token_logps", lambda model, batch: (torch.zeros(4, 3), mask))
    seen = {}

    def loss(policy, old, ref, adv, loss_mask, **kw):
        seen["mask"] = loss_mask
        return LOSSES["grpo"].fn(policy, old, ref, adv, loss_mask, clip_epsilon=0.2, clip_epsilon_high=0.0,
                                 kl_coef=0.0, grpo_token_level=False)

    spec = dataclasses.replace(LOSSES["grpo"], impl=loss)
    batch = {"advantages": torch.ones(4), "rewards": torch.zeros(4), "group_std": torch.zeros(4),
             "completion_keep": 1.0 - source._truncated(rows)}
    _, parts = step.rollout_forward(None, None, spec, batch, {"kl_coef": 0.0}, "cpu", False)
    assert seen["mask"].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert parts["completions/truncated"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert parts["losses"].tolist() == [0.0, -1.0, -1.0, -1.0]


@pytest.mark.parametrize("name", ["dapo", "bnpo", "dr_grpo", "gspo", "luspo", "cispo", "sapo"])
def test_every_loss_of_the_family_trains_through_preftune_grpo(tmp_path, tiny_model_dir, name):
    rows = metrics_rows(_run(tmp_path, tiny_model_dir, name, f"loss.name={name}", "train.max_steps=2").run_dir)
    assert len(rows) == 2 and all(r["completions"] == 8 and r["grad_norm"] > 0 for r in rows), rows
