"""Atomic, pickle-free checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding
    trainable.safetensors   every trainable parameter (the LoRA adapter, or all weights)
    optimizer.safetensors   AdamW state flattened to `<param index>.<name>` tensors
    optimizer.json          param groups (hyperparameters), without tensors
    scheduler.json          the LR scheduler's state (plain numbers)
    rng.safetensors, rng.json  per process: torch CPU (and CUDA) RNG (tensors `torch_cpu.<rank>`);
                            python and numpy RNG (JSON, `ranks[<rank>]`)
    state.json              step, epoch, micro-batches consumed in the epoch, world size, fingerprint
    manifest.json           sha256 and size of every file above; written last
It is written to `.tmp-<pid>-step-N/` (safeio.atomic_path; each file fsynced), then renamed into place and the parent
fsynced, so a kill at any moment leaves either the old set of checkpoints or the new one.
Under FSDP the trainable tensors and optimizer moments are gathered to full tensors first (on every
rank, `snapshot`), and rank 0 writes them: one format at every world size (sharding.py says why).
A checkpoint whose manifest is missing or does not verify does not exist for `resume`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import fields_where
from ..data.sources import split_path
from ..utils.errors import ConfigError, DataError, NumericalError
from ..utils.hashing import file_sha256
from ..utils.safeio import atomic_path, read_json
from ..utils.sharding import full_tensors, gather_objects, rank_and_world, shard_like
from ..utils.version import __version__

__all__ = ["snapshot", "save_checkpoint", "save_best", "restore_best", "find_checkpoint", "load_checkpoint", "Checkpoint", "assert_finite",
           "fingerprint", "check_fingerprint"]

FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
         "rng.safetensors", "rng.json", "state.json")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # step, epoch, batches_in_epoch, fingerprint


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write non-finite weights (exit 3)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericalError(f"{what}: tensor {name} is not finite; refusing to save it")


def _optimizer_parts(optimizer) -> tuple[dict, dict]:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer
    sd = inner.state_dict()
    tensors = full_tensors({f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()})
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _load_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for g in inner.param_groups for p in g["params"]]  # state index i is params[i]
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        like = params[int(index)]
        if value.shape == like.shape:  # moments are laid out like their parameter (sharded under FSDP)
            value = shard_like(value, like)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    inner.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


@dataclass
class Snapshot:
    """What a checkpoint holds, as full CPU tensors, on every rank (rank 0 writes it)."""
    trainable: dict
    optimizer: tuple[dict, dict]
    rng: list[dict]  # one per rank, in rank order
    world_size: int


def snapshot(trainable: dict, optimizer) -> Snapshot:
    """Gather what a checkpoint needs. Every rank must call it (sharded tensors are gathered)."""
    return Snapshot(full_tensors(trainable), _optimizer_parts(optimizer), gather_objects(_rng_state()),
                    rank_and_world()[1])


def save_checkpoint(run_dir: Path, *, step: int, snap: Snapshot, scheduler, state: dict, keep_last: int) -> Path:
    """Write `snap` (rank 0 only) atomically as checkpoints/step-N."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    assert_finite(snap.trainable, f"checkpoint at step {step}")
    final = root / f"step-{step:08d}"
    with atomic_path(final, directory=True, replace_dir=True) as tmp:
        save_file(snap.trainable, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = snap.optimizer
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        rng_tensors = {f"{kind}.{rank}": r[kind] for rank, r in enumerate(snap.rng)
                       for kind in ("torch_cpu", "torch_cuda") if r[kind] is not None}
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "rng.json").write_text(json.dumps({"ranks": [{"python": r["python"], "numpy": r["numpy"]}
                                                            for r in snap.rng]}))
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": snap.world_size, **state}))
        manifest = {}
        for name in FILES:
            _fsync(tmp / name)
            manifest[name] = {"sha256": file_sha256(tmp / name), "size": (tmp / name).stat().st_size}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
    _fsync(root)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep_last]:
        shutil.rmtree(old)  # the newest (just written, verified finite) is never among these
    return final


def _problem(path: Path) -> str | None:
    """Why this checkpoint cannot be used, or None when every file verifies. A hand-edited or
    corrupt manifest (wrong types, missing keys, names outside the checkpoint) is a reason too."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        entries = read_json(manifest)
    except DataError as err:
        return f"manifest.json: {err.problem}"
    if not isinstance(entries, dict):
        return "manifest.json is not an object"
    for name in FILES:
        entry, file = entries.get(name), path / name
        if entry is None or not file.is_file():
            return f"{name} is missing"
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            return f"manifest.json: {name}: expected {{size: int, sha256: str}}"
        if file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in manifest.json"
    try:
        state = read_json(path / "state.json")
    except DataError as err:
        return f"state.json: {err.problem}"
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "epoch", "batches_in_epoch"))
            and isinstance(state.get("fingerprint"), dict)):
        return "state.json lacks step/epoch/batches_in_epoch/fingerprint"
    return None


def find_checkpoint(run_dir: Path, log=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; names each newer one it skips, removes stale temps."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for stale in root.glob(".tmp-*"):
        log(f"removing unfinished checkpoint {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    for path in sorted((p for p in root.iterdir() if p.name.startswith("step-")), reverse=True):
        problem = _problem(path)
        if problem is None:
            return Checkpoint(path, read_json(path / "state.json"))
        log(f"skipping checkpoint {path}: {problem}")
    return None


def save_best(run_dir: Path, step: int, trainable: dict) -> Path:
    """train.keep_best: the trainable weights of the best probe so far as RUN/best/step-N.safetensors
    (full CPU tensors, rank 0 writes; one file: a newer best replaces it)."""
    root = run_dir / "best"
    root.mkdir(exist_ok=True)
    assert_finite(trainable, f"best weights at step {step}")
    dest = root / f"step-{step:08d}.safetensors"
    with atomic_path(dest) as tmp:
        save_file(trainable, tmp)
    for old in root.glob("step-*.safetensors"):
        if old != dest:
            old.unlink()
    return dest


def restore_best(run_dir: Path, step: int, params: dict) -> None:
    """Put the weights `save_best` kept for `step` back into `params` (sharded ones by their shard)."""
    path = run_dir / "best" / f"step-{step:08d}.safetensors"
    if not path.is_file():
        raise ConfigError(str(path), "train.keep_best", "the best probe's weights are missing; rerun without "
                          "train.keep_best or from scratch")
    weights = load_file(path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(weights[name], p))


def load_checkpoint(ckpt: Checkpoint, *, params: dict, optimizer, scheduler) -> None:
    """Restore trainable weights, optimizer, scheduler and every RNG in place."""
    weights = load_file(ckpt.path / "trainable.safetensors")
    for name, p in params.items():  # --allow-config-change must not reach a shape error in torch
        if name not in weights or weights[name].shape != p.shape:
            got = "missing" if name not in weights else f"shape {tuple(weights[name].shape)}"
            raise ConfigError(str(ckpt.path), "checkpoint", f"tensor {name} is {got} there but {tuple(p.shape)} "
                              "in this model (lora rank, targets or model changed); start a new run")
    if set(weights) - set(params):
        extra = sorted(set(weights) - set(params))[0]
        raise ConfigError(str(ckpt.path), "checkpoint", f"tensor {extra} has no place in this model "
                          "(lora targets or model changed); start a new run")
    rank, world = rank_and_world()
    saved_world = ckpt.state.get("world_size", 1)
    if saved_world != world:
        raise ConfigError(str(ckpt.path), "checkpoint", f"written by {saved_world} process(es), resumed by {world}; "
                          f"resume with the same number of processes (the data order and per-process RNG depend on it)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(weights[name], p))
    # the manifest's sha256s only say the files are the ones written: a checkpoint edited and re-hashed
    # (a renamed optimizer key, a scheduler state of another shape) is one line naming it, not exit 1
    where = "optimizer.safetensors"
    try:
        _load_optimizer(optimizer, load_file(ckpt.path / where), read_json(ckpt.path / "optimizer.json"))
        where = "scheduler.json"
        scheduler.load_state_dict(read_json(ckpt.path / where))
        where = "rng.json"
        rng_tensors = load_file(ckpt.path / "rng.safetensors")
        rng = read_json(ckpt.path / where)
        mine = rng["ranks"][rank] if "ranks" in rng else rng  # older checkpoints held one process's RNG, at the top
        torch.set_rng_state(rng_tensors.get(f"torch_cpu.{rank}", rng_tensors.get("torch_cpu")))
        if torch.cuda.is_available() and f"torch_cuda.{rank}" in rng_tensors:
            torch.cuda.set_rng_state(rng_tensors[f"torch_cuda.{rank}"])
        random.setstate((mine["python"][0], tuple(mine["python"][1]), mine["python"][2]))
        np.random.set_state((mine["numpy"][0], np.array(mine["numpy"][1], dtype=np.uint32), *mine["numpy"][2:]))
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise ConfigError(str(ckpt.path / where), "checkpoint", f"does not fit this run's optimizer and schedule "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'malformed'}); "
                          "was it edited? resume from an earlier checkpoint or start a new run") from None


# ---- exact resume: what a checkpoint must agree with (the data order is data/order.py) ----

def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def file_digest(path: str) -> str | None:
    file = split_path(path)[0] if path else None
    return file_sha256(file) if file is not None and file.is_file() else None


def fingerprint(cfg, tokenizer) -> dict:
    """What a checkpoint must agree with to be resumed: data, tokenizer, and training math (every
    model/data/loss/train setting except those marked `resume=False` in config.py)."""
    return {"preftune_version": __version__, "data.train_sha256": file_digest(cfg.data.train_path),
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            **{f"{section}.{k}": _plain(getattr(getattr(cfg, section), k))
               for section in ("model", "data", "loss", "train") for k in fields_where(getattr(cfg, section), "resume")}}


def _plain(value):
    return json.loads(json.dumps(value))  # lists and dicts as a fresh copy, the way the state file stores them


def check_fingerprint(saved: dict, current: dict, allow_change: bool, path: Path) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key) and not allow_change:
            raise ConfigError(str(path), key, f"changed since the checkpoint ({saved.get(key)!r} -> "
                              f"{current.get(key)!r}); resume with --allow-config-change to accept")
