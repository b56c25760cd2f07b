"""Handlers of the training commands: train, sft, train-rm, resume, eval, demo, export, sweep,
iterate, online, grpo, synth, bon and the arithmetic task (one small function each; COMMANDS in
__init__.py says which)."""

from __future__ import annotations

import json
from pathlib import Path

from ..apps.demo import DEMO_LR, run_demo
from ..apps.eval import format_eval, read_per_pair, run_eval
from ..apps.export import export_run
from ..apps.report import plot_sweep
from ..apps.sweep import results_table, run_sweep
from ..config import load_config, opt_in_keys, parse_override
from ..core.losses import build_loss
from ..data.sources import write_jsonl
from ..models.rewards.verifiable import arithmetic_problems
from ..runs.online.bon import format_bon, run_bon
from ..runs.online.grpo import run_grpo
from ..runs.online.iterate import run_iterative, run_synth
from ..runs.online.ppo import run_ppo
from ..runs.online.source import run_online
from ..runs.rm import run_train_rm
from ..runs.sft import run_sft
from ..training.train import train
from ..utils.errors import ConfigError
from ..utils.safeio import load_yaml, write_json
from .common import _floats, _is_override, _say_once

__all__ = ["_train", "run_summary", "_resume", "_eval", "_demo", "_export", "_sweep", "_iterate", "_online", "_sft", "_train_rm", "_grpo", "_ppo", "_arithmetic", "_synth", "_bon"]

# ---- train, resume, eval, demo -------------------------------------------------------------

def _train(a) -> int:
    cfg = load_config(a.config, a.overrides)
    result = train(cfg)
    for line in run_summary(result, cfg.data.eval_path):
        _say_once(line)
    return 0


def run_summary(result, eval_path: str = "") -> list[str]:
    """What a finished training run left and what to run next, in at most 8 lines."""
    s, run = result.summary, result.run_dir
    final = s.get("final") or {}
    lines = [f"run: {run} ({result.steps} steps, {s.get('pairs_per_s')} pairs/s)"]
    if "loss" in final:
        margin = final.get("rewards/margins")
        lines.append(f"final step: loss {final['loss']:.4f}" + (f", margin {margin:.4f}" if margin is not None else ""))
    held_out = s.get("eval") or {}
    if "accuracy/implicit_reward" in held_out:
        lo, hi = held_out.get("accuracy/implicit_reward_ci95", [float("nan")] * 2)
        lines.append(f"held-out: accuracy {held_out['accuracy/implicit_reward']:.3f} [{lo:.3f}, {hi:.3f}], margin "
                     f"{held_out['rewards/margins']:.4f} ({held_out['pairs']} pairs)")
    flags = [f"{name} (step {step})" for name, step in (s.get("health") or {}).items()]
    stop = s.get("stopped_early")
    lines.append("health: " + (", ".join(flags) or "no flags") + (f"; stopped early on {stop['check']}" if stop else ""))
    adapter = (run / "model" / "adapter_config.json").is_file()
    lines.append(f"model: {run / 'model'} ({'LoRA adapter' if adapter else 'full model'})")
    lines.append(f"next: preftune eval --run {run} --data {eval_path or 'HELDOUT.jsonl'}")
    lines.append(f"      preftune export {run} --out {run.parent / (run.name + '-export')}" + (" --merge" if adapter else ""))
    return lines


def _resume(a) -> int:
    config = a.config or Path(a.run_dir) / "config.yaml"
    if not Path(config).is_file():
        raise ConfigError(str(a.run_dir), "config.yaml", "not found; pass -c CONFIG to start this run")
    cfg = load_config(config, [*a.overrides, f"run.output_dir={a.run_dir}"], saved_run=a.config is None)
    kind = build_loss(cfg.loss.name, cfg.loss.mix).kind
    # the kind's own runner resumes it; pairs sampled during the run (online DPO) resume through theirs
    online = kind.data == "pairs" and not cfg.data.train_path and cfg.online.prompts_path
    result = (run_online if online else kind.run)(cfg, resume=True, allow_config_change=a.allow_config_change)
    if isinstance(result, dict):  # a reward model (an ensemble member resumes as one)
        _say_once(f"run: {result['run']} (reward model: rm:{result['run']})")
        return 0
    _say_once(f"run: {result.run_dir} ({result.steps} steps)")
    return 0


def _eval(a) -> int:
    config = a.config
    if config is None and a.run:
        config = Path(a.run) / "config.yaml"
        if not config.is_file():
            raise ConfigError(str(a.run), "config.yaml", "not a run directory (no config.yaml)")
    # `--data a b section.key=v`: argparse hands the override to --data; give it back
    is_override = [_is_override(x) and not Path(x).exists() for x in a.data]
    a.overrides += [x for x, o in zip(a.data, is_override) if o]
    a.data = [x for x, o in zip(a.data, is_override) if not o]
    baseline = read_per_pair(a.baseline) if a.baseline else None  # a bad file fails before any weights load
    rows = [] if a.per_pair else None
    result = run_eval(load_config(config, a.overrides, saved_run=a.config is None and a.run is not None),
                      run_dir=a.run, data_path=a.data, reward=a.reward, per_pair=rows, baseline=baseline,
                      baseline_name=a.baseline or "")
    if rows is not None:
        write_jsonl(a.per_pair, rows)
    if a.json:
        print(write_json(result, a.out))
    else:
        write_json(result, a.out)
        print(format_eval(result) + (f"\n(JSON: {a.out})" if a.out else ""))
    return 0


def _demo(a) -> int:
    cfg = load_config(None, a.overrides)
    lr = cfg.train.lr if any(o.startswith("train.lr=") for o in a.overrides) else DEMO_LR
    run_demo(Path(a.output_dir), quick=a.quick, model=cfg.model.name_or_path, lr=lr)
    return 0


def _export(a) -> int:
    for text in a.overrides:
        if parse_override(text)[0] not in opt_in_keys():
            raise ConfigError("command line", text.split("=")[0], "export takes only the opt-ins "
                              f"{', '.join(opt_in_keys())}; the rest comes from the run's config.yaml")
    result = export_run(a.run_dir, a.out, merge=a.merge, overwrite=a.overwrite, push_to_hub=a.push_to_hub,
                        opt_ins=a.overrides)
    print(f"export: {result.out} ({result.kind}; model card: {result.out / 'README.md'})")
    if result.pushed:
        print(f"pushed: {result.pushed}")
    return 0


# ---- sweep, iterate, online, synth ---------------------------------------------------------

def _sweep(a) -> int:
    cfg = load_config(a.config, a.overrides)
    rows = run_sweep(cfg, betas=_floats(a.beta, "--beta"), lrs=_floats(a.lr, "--lr"),
                     warmups=_floats(a.warmup, "--warmup") if a.warmup else None, reward=a.reward)
    root = Path(cfg.run.output_dir)
    plot_sweep(rows, root)
    print(results_table(rows))
    print(f"sweep: {root}/results.md, kl_vs_beta.png, reward_vs_kl.png")
    return 0


def _iterate(a) -> int:
    run_iterative(load_config(a.config, a.overrides))
    return 0


def _online(a) -> int:
    result = run_online(load_config(a.config, a.overrides))
    _say_once(f"run: {result.run_dir} ({result.steps} steps)")
    return 0


def _sft(a) -> int:
    result = run_sft(load_config(a.config, ["loss.name=nll", *a.overrides]))
    _say_once(f"run: {result.run_dir} ({result.steps} steps, {result.summary['pairs_per_s']} examples/s)")
    held_out = result.summary.get("eval")
    if held_out:
        _say_once(f"held-out ({held_out['examples']} examples, {held_out['tokens']} tokens): NLL/token "
                  f"{held_out['nll/token_before']:.4f} -> {held_out['nll/token']:.4f}, perplexity "
                  f"{held_out['perplexity_before']:.2f} -> {held_out['perplexity']:.2f}")
    model = result.run_dir / "model"
    nxt = f"model.adapter_name_or_path={model}" if (model / "adapter_config.json").exists() else f"model.name_or_path={model}"
    _say_once(f"next: preftune train data.train_path=PAIRS {nxt}   (DPO from this SFT model; it is also the reference)")
    return 0


def _train_rm(a) -> int:
    out = run_train_rm(load_config(a.config, ["loss.name=bt", *a.overrides]), ensemble=a.ensemble, split=a.split,
                       disagreement_penalty=a.disagreement_penalty)

    def line(name: str, ev: dict) -> str:
        lo, hi = ev["accuracy/implicit_reward_ci95"]
        return (f"{name}: held-out pair accuracy {ev['accuracy/implicit_reward']:.3f} [{lo:.3f}, {hi:.3f}] on "
                f"{ev['pairs']} pairs, ECE {ev['calibration']['ece']:.3f}")

    if a.ensemble == 1 and out["eval"]:
        _say_once(line("reward model", out["eval"]))
    for k, ev in enumerate(out.get("member_eval") or []):
        if ev:
            _say_once(line(f"member {k}", ev))
    if out.get("ensemble_eval"):
        e = out["ensemble_eval"]
        lo, hi = e["accuracy_ci95"]
        _say_once(f"ensemble of {a.ensemble}: held-out accuracy {e['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], members "
                  f"disagree on {e['disagreement']:.1%} of pairs, mean margin spread {e['margin_spread_mean']:.3f}")
    _say_once(f"reward source: rm:{out['run']}   (preftune iterate online.reward=rm:{out['run']} ...)")
    return 0


def _with_loss(a, default: str):
    """The config, with loss.name `default` unless the command line or the config file names a loss
    (a recipe always does): `preftune grpo -c dapo.yaml` trains DAPO, `preftune ppo` trains PPO."""
    named = any(o.partition("=")[0].strip() == "loss.name" for o in a.overrides)
    if a.config and not named:
        data = {} if str(a.config).startswith("recipe:") else (load_yaml(a.config, field="-c") or {})
        loss = data.get("loss") if isinstance(data, dict) else None
        named = str(a.config).startswith("recipe:") or (isinstance(loss, dict) and "name" in loss)
    return load_config(a.config, a.overrides if named else [f"loss.name={default}", *a.overrides])


def _grpo(a) -> int:
    return _say_held_out(run_grpo(_with_loss(a, "grpo")))


def _ppo(a) -> int:
    return _say_held_out(run_ppo(_with_loss(a, "ppo")))


def _say_held_out(result) -> int:
    _say_once(f"run: {result.run_dir} ({result.steps} steps)")
    held_out = result.summary.get("eval")
    if held_out:
        lo, hi = held_out["reward/gain_ci95"]
        _say_once(f"held-out reward ({held_out['reward/source']}, {held_out['prompts']} prompts x "
                  f"{held_out['samples_per_prompt']}): reference {held_out['reward/reference']:.3f} -> policy "
                  f"{held_out['reward/policy']:.3f}, gain {held_out['reward/gain']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                  f"KL {held_out['kl']:.2f}")
    return 0


def _arithmetic(a) -> int:
    out = Path(a.out_dir)
    try:
        splits = {name: arithmetic_problems(n, split=name, seed=a.seed, ops=a.ops, high=a.max_operand)
                  for name, n in (("train", a.train), ("heldout", a.heldout))}
    except ValueError as err:
        raise ConfigError("command line", "arithmetic", str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    print(f"{out / 'train.jsonl'}: {a.train} problems; {out / 'heldout.jsonl'}: {a.heldout} problems "
          f"(reward: online.reward=arithmetic)")
    return 0


def _synth(a) -> int:
    cfg = load_config(a.config, [*a.overrides, f"online.prompts_path={a.prompts}", f"online.reward={a.reward}"])
    print(json.dumps(run_synth(cfg, a.out)))
    return 0


def _bon(a) -> int:
    ns = _floats(a.eval, "--eval") if a.eval else None
    if ns is not None and (not ns or any(x != int(x) or x < 1 for x in ns)):
        raise ConfigError("command line", "--eval", f"expected comma-separated whole numbers >= 1, got {a.eval!r}")
    ns = [int(x) for x in ns] if ns else None
    if not (a.out or a.pairs or ns):
        raise ConfigError("command line", "bon", "nothing to write: give --out, --pairs or --eval")
    n = a.n or (max(ns) if ns else None)
    overrides = [*a.overrides, f"online.reward={a.reward}", *([f"online.samples_per_prompt={n}"] if n else [])]
    result = run_bon(load_config(None, overrides), a.prompts, policy=a.policy, out=a.out, pairs_out=a.pairs,
                     keep_all=a.keep_all, eval_ns=ns, eval_out=a.eval_out)
    print(format_bon(result))
    return 0
