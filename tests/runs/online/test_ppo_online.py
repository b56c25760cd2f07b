"""PPO (with a critic), RLOO and REINFORCE++ through train()'s one loop: metrics, the critic's
parameters in the optimizer and checkpoints, one step against a hand-written one on the same
samples, exact resume, and refusals."""

import json
import math

import pytest
import torch

from conftest import metrics_rows
from preftune.cli import main
from preftune.config import load_config
from preftune.runs.online.ppo import run_ppo

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?",
           "The soundtrack was", "My review:"]


def _args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.name_or_path={model_dir}", f"online.prompts_path={prompts}",
            f"online.eval_prompts_path={prompts}", "online.reward=fn:conftest:vowel_reward",
            "online.max_new_tokens=6", "online.samples_per_prompt=2", "online.prompts_per_step=2", "model.lora_r=4",
            "train.lr=1e-2", "train.max_steps=4", "diagnostics.probe_every=0", "data.max_length=64",
            "data.max_prompt_length=32", "ppo.epochs=2", "loss.name=ppo", *extra]


@pytest.mark.parametrize("loss", ["ppo", "rloo", "reinforce_pp"])
def test_each_policy_gradient_loss_trains_and_logs_its_metrics(tmp_path, tiny_model_dir, loss):
    run = tmp_path / loss
    result = run_ppo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={run}", f"loss.name={loss}")))
    rows = metrics_rows(run)
    assert result.steps == 4 and len(rows) == 4
    for key in ("reward/mean", "kl", "reward/non_score", "policy/clipfrac", "policy/approx_kl", "entropy",
                "returns/mean"):
        assert all(key in r for r in rows), key
    assert ("value/loss" in rows[0]) == (loss == "ppo") == ("value/explained_variance" in rows[0])
    assert result.summary["health"] == {}  # no check fires on a healthy run (a NaN metric did for rloo)
    assert result.summary["eval"]["prompts"] == len(PROMPTS)


def _hand_gae(scores, old, ref, values, m, *, kl_coef, gamma, lam):
    """GAE by a plain loop over each row's completion tokens, then whitening over every token."""
    advs, rets = [], []
    for n in range(m.size(0)):
        idx = m[n].nonzero().flatten().tolist()
        r = [-kl_coef * (old[n, t] - ref[n, t]).item() for t in idx]
        r[-1] += scores[n].item()
        v = [values[n, t].item() for t in idx]
        a, running = [0.0] * len(idx), 0.0
        for k in reversed(range(len(idx))):
            nxt = v[k + 1] if k + 1 < len(idx) else 0.0
            running = r[k] + gamma * nxt - v[k] + gamma * lam * running
            a[k] = running
        advs += a
        rets += [x + y for x, y in zip(a, v)]
    advs, rets = torch.tensor(advs), torch.tensor(rets)
    return (advs - advs.mean()) / torch.sqrt(advs.var() + 1e-8), rets


def test_one_ppo_step_of_the_loop_equals_a_hand_written_one(tmp_path, tiny_model_dir, monkeypatch):
    """On the loop's own samples: the advantages and returns equal GAE written out by hand from the
    scores, the policy's and reference's log-probs and the critic's values (full-logits forwards);
    and the second pass (ratio != 1, clipping live) has the loss and gradients of a hand-written
    clipped policy + clipped value loss, for the policy's adapter and the critic alike."""
    import sys

    train_module = sys.modules["preftune.training.train"]
    real, seen = train_module.loss_forward, []

    def spy(model, reference, spec, batch, kwargs, **kw):
        losses, parts = real(model, reference, spec, batch, kwargs, **kw)
        critic = kwargs["critic"]
        ids, am, m = batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:].bool()

        def token_logps(net):
            logits = net(input_ids=ids, attention_mask=am).logits[:, :-1].float()
            return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

        def spread(flat):
            out = torch.zeros(m.shape)
            out[m] = flat
            return out

        lp = token_logps(model)
        hidden = critic.trunk(input_ids=ids, attention_mask=am).last_hidden_state
        values = critic.head(hidden).squeeze(-1)[:, :-1]
        old, adv, ret, old_v = (spread(batch[k]) for k in ("old_logps", "advantages", "returns", "old_values"))
        if not seen:  # first pass: the weights that sampled; check the advantages by hand
            with torch.no_grad(), reference.context():
                ref = token_logps(reference.forward_model(model))
            hand_adv, hand_ret = _hand_gae(batch["rewards"], lp.detach(), ref, values.detach(), m, kl_coef=0.3,
                                           gamma=0.9, lam=0.8)
            seen.append({"adv": (batch["advantages"], hand_adv), "ret": (batch["returns"], hand_ret),
                         "old": (batch["old_logps"], lp.detach()[m])})
            return losses, parts
        params = [p for p in model.parameters() if p.requires_grad] + [p for p in critic.parameters()
                                                                        if p.requires_grad]
        got = torch.autograd.grad(losses.mean(), params, retain_graph=True)
        ratio = torch.exp(lp - old)
        pg = -torch.min(ratio * adv, ratio.clamp(0.9, 1.1) * adv)
        v_clip = old_v + (values - old_v).clamp(-0.05, 0.05)
        vf = 0.5 * torch.max((values - ret) ** 2, (v_clip - ret) ** 2)
        hand = pg[m].mean() + 0.5 * vf[m].mean()
        want = torch.autograd.grad(hand, params)
        seen.append({"loss": (losses.mean().item(), hand.item()),
                     "clipped": ((ratio - 1).abs()[m] > 0.1).float().mean().item(),
                     "grad": max((a - b).abs().max().item() for a, b in zip(got, want)),
                     "scale": max(b.abs().max().item() for b in want)})
        return losses, parts

    monkeypatch.setattr(train_module, "loss_forward", spy)
    run_ppo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'p'}", "train.max_steps=2",
                                    "ppo.kl_coef=0.3", "ppo.gamma=0.9", "ppo.lam=0.8", "loss.clip_epsilon=0.1",
                                    "loss.vf_clip=0.05", "loss.vf_coef=0.5", "train.lr=0.05")))
    first, second = seen
    for key in ("adv", "ret", "old"):
        assert torch.allclose(*first[key], atol=1e-5), key
    assert second["clipped"] > 0  # the second pass really clips
    assert second["loss"][0] == pytest.approx(second["loss"][1], abs=1e-6)
    assert second["scale"] > 1e-4 and second["grad"] < 1e-6 * max(1.0, second["scale"]), second


@pytest.mark.parametrize("loss,extra", [("ppo", ["ppo.mini_batches=2", "ppo.kl_target=0.5", "ppo.kl_horizon=10"]),
                                        ("rloo", [])])
def test_interrupted_then_resumed_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch, loss, extra):
    """Checkpoints every step: the cut lands inside a batch of samples (its saved copy is read
    back), the critic is restored with the policy, and the adaptive KL coefficient carries over."""
    from conftest import interrupt_after_checkpoint, weights_sha

    def cfg(name):
        return load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}",
                                       f"loss.name={loss}", "train.checkpoint_every=1", "model.lora_dropout=0.1",
                                       "train.max_steps=5", *extra))

    full = run_ppo(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_ppo(cfg("cut")))
    resumed = run_ppo(cfg("cut"), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000003")
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)
    assert metrics_rows(resumed.run_dir) == metrics_rows(full.run_dir)
    if loss == "ppo":
        coefs = [r["kl_coef"] for r in metrics_rows(full.run_dir)]
        assert coefs[0] == pytest.approx(0.05) and len(set(coefs)) > 1  # steered after each batch of samples


def test_the_critic_trains_and_is_checkpointed_beside_the_policy(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = tmp_path / "c"
    run_ppo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "train.checkpoint_every=2",
                                    "train.max_steps=3")))
    saved = load_file(run / "checkpoints" / "step-00000002" / "trainable.safetensors")
    critic = [k for k in saved if k.startswith("critic.")]
    assert "critic.head.weight" in saved and any("lora_A" in k for k in critic)
    assert all(not k.startswith("critic.") or "lora_" in k or k.startswith("critic.head") for k in saved)
    assert json.loads((run / "data_stats.json").read_text())["critic"] == "starting weights"
    rows = metrics_rows(run)
    assert all(math.isfinite(r["value/loss"]) for r in rows)


def test_a_shared_critic_adds_only_a_value_head(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = tmp_path / "s"
    run_ppo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "ppo.shared_critic=true",
                                    "train.checkpoint_every=2", "train.max_steps=3")))
    saved = load_file(run / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert sorted(k for k in saved if k.startswith("critic.")) == ["critic.head.bias", "critic.head.weight"]


def test_refusals_are_one_line(tmp_path, tiny_model_dir, capsys):
    rc = main(["ppo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'g'}", "loss.name=grpo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "(ppo, rloo, reinforce_pp)" in err[0], err


@pytest.mark.slow
def test_ppo_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
    from conftest import kill_and_resume_trials

    args = _args(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.max_steps=8", "model.lora_dropout=0.1",
                 "ppo.mini_batches=2")
    outcomes = kill_and_resume_trials(tmp_path, "ppo", args, trials=2, seed=7)
    assert all(same for same, *_ in outcomes), outcomes


@pytest.mark.slow
def test_rloo_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
    from conftest import kill_and_resume_trials

    args = _args(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.max_steps=8", "model.lora_dropout=0.1",
                 "loss.name=rloo")
    outcomes = kill_and_resume_trials(tmp_path, "ppo", args, trials=2, seed=8)
    assert all(same for same, *_ in outcomes), outcomes


@pytest.mark.parametrize("loss,key", [("grpo", "ppo.kl_coef=0.1"), ("rloo", "ppo.gamma=0.9"),
                                      ("ppo", "ppo.reinforce_baseline=true"), ("sigmoid", "ppo.epochs=2")])
def test_a_ppo_setting_the_loss_does_not_read_is_refused(tmp_path, loss, key):
    from preftune.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
        load_config(None, [f"loss.name={loss}", key])
    load_config(None, ["loss.name=reinforce_pp", "ppo.reinforce_baseline=true", "ppo.kl_coef=0.1"])  # read: accepted


def test_sampling_time_log_probs_and_values_are_taken_without_dropout(tmp_path, tiny_model_dir, monkeypatch):
    """With dropout on the adapter, the log-probs and values a batch of samples is judged by are the
    eval-mode ones (dropout off), the ratio's denominator, not one noisy draw."""
    import sys

    train_module = sys.modules["preftune.training.train"]
    real, seen, calls = train_module.loss_forward, {}, []

    def spy(model, reference, spec, batch, kwargs, **kw):
        calls.append(1)
        if len(calls) == 3:  # the second batch of samples (2 epochs each): the adapter is no longer zero
            critic, m = kwargs["critic"], batch["completion_mask"][:, 1:].bool()
            ids, am = batch["input_ids"], batch["attention_mask"]
            model.eval(), critic.eval()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
                lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                values = critic(ids, am)[:, :-1]
            model.train(), critic.train()
            seen.update(lp=(batch["old_logps"], lp[m]), v=(batch["old_values"], values[m]))
        return real(model, reference, spec, batch, kwargs, **kw)

    monkeypatch.setattr(train_module, "loss_forward", spy)
    run_ppo(load_config(None, _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'd'}", "train.max_steps=3",
                                    "model.lora_dropout=0.5")))
    assert torch.allclose(*seen["lp"], atol=1e-6) and torch.allclose(*seen["v"], atol=1e-6)


def test_the_ppo_verb_trains_ppo_unless_told_otherwise(tmp_path, tiny_model_dir, capsys):
    args = [a for a in _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'v'}", "train.max_steps=1")
            if a != "loss.name=ppo"]
    assert main(["ppo", *args]) == 0
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["loss"] == "ppo"
    assert "held-out reward" in capsys.readouterr().out


def test_a_config_file_that_names_a_loss_keeps_it(tmp_path, tiny_model_dir):
    cfg = tmp_path / "rloo.yaml"
    cfg.write_text("loss:\n  name: rloo\n")
    args = [a for a in _args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'r'}", "train.max_steps=1")
            if a != "loss.name=ppo"]
    assert main(["ppo", "-c", str(cfg), *args]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["loss"] == "rloo"
