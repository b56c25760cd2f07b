"""GRPO through train()'s one loop: metrics, the held-out measure, the loss the loop computes
against a hand-written one on the same samples, exact resume, and its refusals."""

import json
import sys

import pytest
import torch

from conftest import (
    PAIRS,
    interrupt_after_checkpoint,
    kill_and_resume_trials,
    metrics_rows,
    weights_sha,
    write_jsonl,
)
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import build_loss
from preftune.models.rewards import build_reward
from preftune.runs.online.grpo import MAX_ATTEMPTS, GRPOSource, run_grpo
from preftune.training.train import train
from preftune.utils.errors import ConfigError

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?",
           "The soundtrack was", "My review:"]


def _args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.name_or_path={model_dir}", f"online.prompts_path={prompts}",
            f"online.eval_prompts_path={prompts}", "online.reward=fn:conftest:vowel_reward",
            "online.max_new_tokens=6", "online.samples_per_prompt=4", "online.prompts_per_step=2", "model.lora_r=4",
            "train.lr=1e-2", "train.max_steps=6", "diagnostics.probe_every=0", "data.max_length=64",
            "data.max_prompt_length=32", "loss.name=grpo", *extra]


def test_grpo_logs_group_metrics_probes_and_a_held_out_reward(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "g"
    assert main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "diagnostics.probe_every=3",
                                "train.checkpoint_every=2")]) == 0
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward/mean", "reward/group_std", "groups/zero_variance", "kl", "clipped", "ratio",
                "lengths/completion", "grad_norm", "online/samples"):
        assert key in rows[0], key
    assert all(r["completions"] == 8 and r["online/samples"] == 8 * r["online/draws"] for r in rows)
    assert rows[0]["kl"] == 0.0 and rows[0]["ratio"] == 1.0 and rows[0]["clipped"] == 0.0  # step 1: policy == reference
    assert [r["step"] for r in rows if "probe/kl" in r] == [3, 6]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    summary = json.loads((run / "summary.json").read_text())
    held = summary["eval"]
    assert held["prompts"] == len(PROMPTS) and held["samples_per_prompt"] == 4
    assert held["reward/gain"] == pytest.approx(held["reward/policy"] - held["reward/reference"])
    assert held["reward/gain_ci95"][0] <= held["reward/gain"] <= held["reward/gain_ci95"][1]
    assert summary["layout"]["layout"] == "packed" and summary["layout"]["prefix_sharing"]  # checked exact
    assert summary["data"]["source"] == "grpo"
    assert (run / "model" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "held-out reward (fn:conftest:vowel_reward, 6 prompts x 4): reference" in out


def test_the_loop_computes_the_grpo_loss_of_its_samples(tmp_path, tiny_model_dir, monkeypatch):
    """The first step's loss and gradient equal a hand-written GRPO step on the same sampled rows
    and model: advantages from the group rewards, per-token log-probs from a plain full-logits
    forward, k3 KL against the adapters-off reference, per-completion token mean."""
    train_module = sys.modules["preftune.training.train"]
    seen = {}
    real = train_module.loss_forward

    def spy(model, reference, spec, batch, kwargs, **kw):
        losses, parts = real(model, reference, spec, batch, kwargs, **kw)
        if not seen:
            params = [p for p in model.parameters() if p.requires_grad]
            got = torch.autograd.grad(losses.mean(), params, retain_graph=True)
            ids, m = batch["input_ids"], batch["completion_mask"][:, 1:].float()

            def token_logps(net):
                logits = net(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
                return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

            lp = token_logps(model)
            with torch.no_grad(), reference.context():
                ref = token_logps(reference.forward_model(model))
            r = batch["rewards"].view(-1, 4)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
            per_token = -torch.exp(lp - lp.detach()) * adv[:, None] + 0.5 * (torch.exp(ref - lp) - (ref - lp) - 1)
            hand = ((per_token * m).sum(1) / m.sum(1)).mean()
            want = torch.autograd.grad(hand, params)
            seen.update(loss=losses.mean().item(), hand=hand.item(), adv=(batch["advantages"], adv),
                        grad=max((a - b).abs().max().item() for a, b in zip(got, want)),
                        scale=max(b.abs().max().item() for b in want))
        return losses, parts

    monkeypatch.setattr(train_module, "loss_forward", spy)
    result = run_grpo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'g'}",
                                              "train.max_steps=1", "loss.kl_coef=0.5", "data.layout=padded")))
    assert torch.allclose(*seen["adv"], atol=1e-6)
    assert seen["loss"] == pytest.approx(seen["hand"], abs=1e-6)
    assert seen["scale"] > 1e-4 and seen["grad"] < 1e-6 * max(1.0, seen["scale"]), seen
    assert metrics_rows(result.run_dir)[0]["loss"] == pytest.approx(seen["loss"], abs=1e-6)


def test_packed_groups_with_a_shared_prompt_equal_padded_rows(tmp_path, tiny_model_dir):
    """A group packed as [prompt, c_1, ..., c_G] (the prompt once) trains exactly as padded rows:
    same samples, per-step losses, KL and grad norms within float tolerance."""
    runs = {layout: metrics_rows(run_grpo(load_config(None, _args(
        tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / layout}", f"data.layout={layout}",
        "loss.kl_coef=0.5", "train.max_steps=4"))).run_dir) for layout in ("packed", "padded")}
    for a, b in zip(runs["packed"], runs["padded"]):
        assert a["reward/mean"] == b["reward/mean"] and a["lengths/completion"] == b["lengths/completion"]
        for key in ("loss", "kl", "grad_norm", "logps/completion"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-4), (key, a[key], b[key])


def test_grpo_interrupted_then_resumed_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    def cfg(name):
        return load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}",
                                       "train.checkpoint_every=1", "model.lora_dropout=0.1"))

    full = run_grpo(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_grpo(cfg("cut")))
    resumed = run_grpo(cfg("cut"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000003")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert metrics_rows(resumed.run_dir) == metrics_rows(full.run_dir)


@pytest.mark.slow
def test_grpo_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.max_steps=8", "model.lora_dropout=0.1")
    outcomes = kill_and_resume_trials(tmp_path, "grpo", args, trials=2, seed=5)
    assert all(same for same, *_ in outcomes), outcomes


def test_grpo_refusals_are_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="preftune grpo"):  # the loss needs samples, not a file
        train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}",
                                 "loss.name=grpo", f"run.output_dir={tmp_path / 'x'}"]))
    cfg = load_config(None, ["train.max_steps=0", "loss.name=grpo"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        GRPOSource(cfg, build_loss("grpo"), PROMPTS, build_reward("fn:conftest:length_reward"))
    with pytest.raises(ConfigError, match="loss.name"):
        GRPOSource(load_config(None, ["train.max_steps=3"]), build_loss("sigmoid"), PROMPTS,
                   build_reward("fn:conftest:length_reward"))
    # every group fails to score (the verifier knows none of these prompts): one line, exit 2
    rc = main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'g'}",
                              "online.reward=arithmetic")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{MAX_ATTEMPTS} draws" in err[0], err


def test_several_passes_per_batch_of_samples_clip_against_the_sampling_policy(tmp_path, tiny_model_dir):
    """online.grpo_iterations=2: steps 1-2 train on one batch of samples, 3-4 on the next; the
    second pass sees a moved policy (ratio != 1) and the samples are kept in rollouts/."""
    result = run_grpo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'g'}",
                                              "online.grpo_iterations=2", "train.max_steps=4", "train.lr=5e-2",
                                              "loss.clip_epsilon=0.05")))
    rows = metrics_rows(result.run_dir)
    assert rows[0]["reward/mean"] == rows[1]["reward/mean"] and rows[2]["reward/mean"] == rows[3]["reward/mean"]
    assert rows[0]["online/draws"] >= 1 and "online/draws" not in rows[1]  # the second pass samples nothing
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6)  # eval-mode old log-probs, no dropout: the same
    assert rows[1]["ratio"] != pytest.approx(1.0, abs=1e-6) and rows[1]["clipped"] > 0
    assert sorted(p.name for p in (result.run_dir / "rollouts").iterdir()) == [
        "sample-00000000-rank0.safetensors", "sample-00000001-rank0.safetensors"]


def test_resumed_between_two_passes_trains_on_the_saved_samples(tmp_path, tiny_model_dir, monkeypatch):
    def cfg(name):
        return load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}",
                                       "online.grpo_iterations=2", "train.checkpoint_every=1",
                                       "model.lora_dropout=0.1"))

    full = run_grpo(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_grpo(cfg("cut")))  # pass 1 of sample 1 is next
    resumed = run_grpo(cfg("cut"), resume=True)
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert metrics_rows(resumed.run_dir) == metrics_rows(full.run_dir)


def test_the_sampler_and_the_trainer_agree_and_tis_trains(tmp_path, tiny_model_dir):
    """The built-in sampler's log-probs of its own tokens are the trainer's on the same weights: the
    mismatch is logged every step and is float noise; with loss.tis_cap the weights are ~1."""
    run = tmp_path / "m"
    assert main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "train.max_steps=3")]) == 0
    rows = metrics_rows(run)
    assert all(0 <= r["sampler/logp_diff_mean"] <= r["sampler/logp_diff_max"] < 1e-4 for r in rows)
    assert not any("sampler_mismatch" in (r.get("health") or {}) for r in rows)
    tis = tmp_path / "t"
    assert main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={tis}", "train.max_steps=3",
                                "loss.tis_cap=2")]) == 0
    assert all(r["tis/weight"] == pytest.approx(1.0, abs=1e-4) for r in metrics_rows(tis))
