"""Reference log-probs computed once and cached on disk, for every epoch, run and sweep point.

The reference never changes during training, so its summed completion log-probs for each pair
are a function of (reference weights, tokenizer, data, tokenization settings). The cache file
is `$PREFTUNE_CACHE/reference_logps/<key>.safetensors` holding `lines` (the pairs' line numbers)
and `logps` (N, 2: chosen, rejected, float32), with the key the sha256 of all of those inputs
and of the reducer ("sum" of token log-probs). Written to a temp file and renamed: a half-written
cache never exists. Training then never runs the reference model (`train.reference_cache=true`).
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import fields_where
from ..core.logprobs import completion_logps, split_pairs
from ..utils.envvars import cache_root
from ..utils.errors import ConfigError
from ..utils.progress import progress
from ..utils.safeio import atomic_path
from ..utils.sharding import is_fsdp
from .prepare import pair_collator

__all__ = ["cache_key", "cache_path", "load_or_build", "data_settings", "path_for", "read", "reference_cache", "store"]

def data_settings(d) -> dict:
    """The settings that change which tokens a pair has (DataConfig fields marked `tokens=True`;
    the file itself is covered by its content hash)."""
    return {k: getattr(d, k) for k in fields_where(d, "tokens")}


def cache_key(*, reference_sha256: str, tokenizer_sha256: str, data_sha256: str, data_settings: dict) -> str:
    payload = {"reference": reference_sha256, "tokenizer": tokenizer_sha256, "data": data_sha256,
               "settings": data_settings, "reducer": "sum", "format": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_root() / "reference_logps" / f"{key}.safetensors"


def path_for(*, reference_sha256: str, tokenizer_sha256: str, data_sha256: str | None, data_config) -> Path:
    """The cache file for one data file under one reference (training and evaluation both ask here)."""
    return cache_path(cache_key(reference_sha256=reference_sha256, tokenizer_sha256=tokenizer_sha256,
                                data_sha256=data_sha256 or "", data_settings=data_settings(data_config)))


@torch.no_grad()
def _compute(model, reference, pairs, *, batch_size: int, collate) -> dict[int, tuple[float, float]]:
    was_training = model.training
    model.eval()
    out = {}
    starts = range(0, len(pairs), batch_size)
    for i in progress(starts, total=len(pairs), desc="reference logps", unit="pairs",
                      weights=[min(batch_size, len(pairs) - s) for s in starts]):
        chunk = pairs[i: i + batch_size]
        batch = collate(chunk)  # completion_logps places it on the model's device
        with reference.context():
            logps, _ = completion_logps(reference.forward_model(model), batch)
        chosen, rejected = split_pairs(logps)
        out.update({p.line: (c, r) for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist())})
    model.train(was_training)
    return out


def _entries(path: Path) -> dict[int, tuple[float, float]]:
    if not path.is_file():
        return {}
    t = load_file(str(path))
    return {int(line): (c, r) for line, (c, r) in zip(t["lines"].tolist(), t["logps"].tolist())}


def read(path: Path, pairs) -> dict[int, tuple[float, float]] | None:
    """The cached logps keyed by line when the file covers every pair, else None."""
    cached = _entries(path)
    return cached if cached and all(p.line in cached for p in pairs) else None


def _write(path: Path, values: dict[int, tuple[float, float]]) -> None:
    lines = sorted(values)
    with atomic_path(path) as tmp:
        save_file({"lines": torch.tensor(lines, dtype=torch.long),
                   "logps": torch.tensor([values[k] for k in lines], dtype=torch.float32)}, str(tmp))


def store(path: Path, values: dict[int, tuple[float, float]]) -> None:
    """Add these lines' logps to the file (lines already there keep their stored values): how an
    evaluation of the base model leaves its log-probs for a later evaluation of a run trained from it."""
    old = _entries(path)
    if not all(line in old for line in values):
        _write(path, {**values, **old})


def load_or_build(path: Path, model, reference, pairs, *, batch_size: int, collate, build: bool = True,
                  write: bool = True) -> tuple[dict[int, tuple[float, float]], bool]:
    """The cached logps keyed by line, and whether they were read from disk. With `build`
    False (non-main processes) the file must exist; with `write` False they are computed, not saved."""
    cached = read(path, pairs)
    if cached is not None:
        return cached, True
    if not build:
        raise FileNotFoundError(path)
    values = _compute(model, reference, pairs, batch_size=batch_size, collate=collate)
    if write:
        _write(path, values)
    return values, False


def reference_cache(cfg, data, model, reference, tokenizer, info: dict, fp: dict, accelerator, layout) -> dict:
    """Reference logps for every training pair, from the on-disk cache or computed once now."""
    # a hub dataset or a saved dataset directory has no file to hash: without a key that changes with
    # the data, another dataset's cached logps (same record indices) would be read back as this one's
    if fp["data.train_sha256"] is None:
        raise ConfigError(cfg.data.train_path, "train.reference_cache", "needs a data file (its sha256 keys the "
                          "cache; a hub dataset or dataset directory has none): write it as .jsonl or .parquet, "
                          "or set train.reference_cache=false")
    path = path_for(reference_sha256=info["weights_sha256"], tokenizer_sha256=fp["tokenizer_sha256"],
                    data_sha256=fp["data.train_sha256"], data_config=cfg.data)
    start = time.perf_counter()
    build = partial(load_or_build, path, model, reference, data.examples, batch_size=cfg.eval.batch_size,
                    collate=pair_collator(layout, tokenizer))
    if is_fsdp(accelerator):  # a sharded model runs forwards on every rank together; the main one writes
        cached = read(path, data.examples)
        accelerator.wait_for_everyone()  # every rank has looked before any rank writes: one decision
        values, hit = (cached, True) if cached is not None else build(write=accelerator.is_main_process)
    else:
        if accelerator.is_main_process:
            values, hit = build()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            values, hit = build(build=False)
    if accelerator.is_main_process:
        print(f"reference logps: {'read from' if hit else 'computed and cached in'} {path} "
              f"({time.perf_counter() - start:.1f} s)")
    return values
