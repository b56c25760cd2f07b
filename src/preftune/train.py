"""`train(cfg) -> RunResult`: setup, one readable loop on Accelerate, save.

The run directory holds config.yaml (written before step 0), data_stats.json, reference.json,
metrics.jsonl (one line per optimizer step), summary.json and model/ (a PEFT adapter dir or
an HF model dir, safetensors). Errors in data or config surface before any weights load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (
    EpochSampler,
    assert_finite,
    check_fingerprint,
    find_checkpoint,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, save_config
from .diagnostics import health_checks, step_metrics
from .errors import ConfigError, NumericalError
from .layouts import choose_layout
from .logprobs import autocast, completion_logps, fp32_lm_head, split_pairs
from .losses import LossSpec, build_loss
from .models import (
    FrozenCopyReference,
    apply_lora,
    build_reference,
    load_model,
    load_start,
    load_tokenizer,
    resolve_model_dir,
    weights_sha256,
)
from .prepare import (
    load_data,
    loss_kwargs,
    pair_collator,
    prepare_data,
    prepare_pairs,
    probe_baseline,
    reference_cache,
    run_probe,
)
from .rundir import RunLock, finished, read_jsonl_tail_tolerant

__all__ = ["train", "RunResult", "loss_forward", "load_data", "prepare_pairs", "check_output_dir", "loss_kwargs"]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    summary: dict


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(str(path), "run.output_dir", "already exists and is not empty "
                          "(set run.overwrite=true or choose another directory)")


def loss_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, *, bf16: bool = False):
    """One concatenated policy forward (plus a no-grad reference forward when the loss needs one).

    Returns the per-example losses and a dict of detached per-example tensors for the metrics.
    Paired batches are [chosen..., rejected...]; unpaired ones [examples..., KL rows...].
    """
    device = batch["input_ids"].device.type
    with autocast(device, bf16):
        logps, counts = completion_logps(model, batch)
    first, second = split_pairs(logps)
    first_n, second_n = split_pairs(counts)
    if "reference_logps" in batch:  # cached once for the whole run (refcache.py)
        ref_first, ref_second = split_pairs(batch["reference_logps"])
    elif spec.needs_reference:
        with torch.no_grad(), reference.context(), autocast(device, bf16):
            ref_first, ref_second = split_pairs(completion_logps(reference.forward_model(model), batch)[0])
    else:  # reference-free losses never run (or load) a reference
        ref_first = ref_second = torch.zeros_like(first)
    if spec.paired:
        if spec.needs_lengths:
            kwargs = {**kwargs, "chosen_lengths": first_n, "rejected_lengths": second_n}
        out = spec.fn(first, second, ref_first, ref_second, **kwargs)
        parts = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                 "policy_chosen": first, "policy_rejected": second, "chosen_lengths": first_n,
                 "rejected_lengths": second_n}
    else:
        out = spec.fn(first, ref_first, labels=batch["labels"], policy_kl_logps=second,
                      reference_kl_logps=ref_second, **kwargs)
        parts = {"rewards": out.rewards, "labels": batch["labels"], "policy": first, "lengths": first_n}
    n = out.losses.size(0)
    extras = {k: v.expand(n) if v.dim() == 0 else v for k, v in out.metrics.items()}
    parts = {k: v.detach() for k, v in {"losses": out.losses, **parts, **extras}.items()}
    return out.losses, parts


def _save_model(model, tokenizer, dest: Path) -> None:
    """Write to a temp dir beside `dest`, then rename: no half-written model/ ever exists."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _build_policy(cfg: Config, spec: LossSpec, model_dir: str):
    """Policy (with LoRA if asked), its reference, and what to record about the reference. With
    an SFT adapter merged in, the reference is the SFT-adapted model (adapters off = SFT
    weights); kept trainable, the SFT adapter is the policy and a frozen merged copy the reference."""
    m = cfg.model
    model, adapter = load_start(m, model_dir)
    separate = spec.needs_reference and bool(m.reference_name_or_path)  # not the starting weights
    kept = adapter is not None and not m.adapter_merge  # the SFT adapter itself keeps training
    info = {"strategy": "none", "weights_sha256": None}
    if spec.needs_reference and not separate:
        # kept: a frozen merged copy is the reference; the PEFT policy keeps its own (unmerged) weights
        start = copy.deepcopy(model).merge_and_unload() if kept else model
        info = {"strategy": "adapters_off" if m.lora and not kept else "frozen_copy",
                "weights_sha256": weights_sha256(start), "model": model_dir, **(adapter or {})}
    if m.lora and not kept:
        model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules)
    reference = None
    if spec.needs_reference and not separate:
        reference = FrozenCopyReference(start.eval().requires_grad_(False)) if kept \
            else build_reference(model, lora=m.lora)
    if separate:
        ref_dir = resolve_model_dir(m.reference_name_or_path, allow_pickle_weights=m.allow_pickle_weights)
        ref_model = load_model(ref_dir, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                               allow_pickle_weights=m.allow_pickle_weights)
        reference = FrozenCopyReference(ref_model.eval().requires_grad_(False))
        info = {"strategy": "frozen_copy", "weights_sha256": weights_sha256(ref_model), "model": ref_dir}
    return model, reference, info


def _exact_layout(cfg: Config, spec: LossSpec, model, data, tokenizer, model_dir: str):
    """The configured layout if it is exact on this model, else the exact one it falls back to
    (said once, recorded in data_stats.json and summary.json); a copy of `cfg` says which."""
    d = cfg.data
    if not spec.paired or d.layout == "padded":
        return cfg, {"layout": d.layout, "prefix_sharing": d.prefix_sharing}
    layout, sharing, deltas = choose_layout(model, data.examples[: max(cfg.train.batch_size, 2)],
                                            tokenizer.pad_token_id, layout=d.layout, prefix_sharing=d.prefix_sharing,
                                            max_length=d.max_length, name=model_dir)
    info = {"layout": layout, "prefix_sharing": sharing, "checked": deltas}
    if (layout, sharing) == (d.layout, d.prefix_sharing):
        return cfg, info
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, layout=layout, prefix_sharing=sharing))
    data.collate = pair_collator(cfg, tokenizer)
    return cfg, info


def place_reference(reference, accelerator) -> None:
    """Put a frozen reference copy where the policy runs. Adapters-off references are the
    policy itself, so DDP/FSDP/DeepSpeed shard them for free. A frozen copy is moved to the
    device under DDP, and sharded like the policy (evaluation mode) under FSDP; under
    DeepSpeed it is refused: use LoRA, or a reference-free loss."""
    from accelerate.utils import DistributedType

    if not isinstance(reference, FrozenCopyReference):
        return
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("accelerate config", "model.lora", "full fine-tuning with a frozen reference copy is not "
                          "supported under DeepSpeed yet; set model.lora=true (the reference is then the policy "
                          "with adapters off) or use a reference-free loss")
    if kind == DistributedType.FSDP:
        reference.model = accelerator.prepare_model(reference.model, evaluation_mode=True)
    else:
        reference.model.to(accelerator.device)


def _trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train(cfg: Config, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    """Train from `cfg`. With `resume`, continue `cfg.run.output_dir` from its newest valid
    checkpoint (or start fresh there when it has none). One writer per run directory (RunLock)."""
    spec, run_dir = build_loss(cfg.loss.name, cfg.loss.mix), Path(cfg.run.output_dir)
    if not cfg.data.train_path:
        raise ConfigError("defaults", "data.train_path", "is required")
    # the main process alone decides about (and locks) the run dir: global rank 0, as launchers set
    # it (Accelerate's own state is not built yet, and building it early would fix its settings)
    main = os.environ.get("RANK", "0") == "0"
    if not resume and main:
        check_output_dir(run_dir, cfg.run.overwrite)
    elif resume and (done := finished(run_dir)) is not None:
        raise ConfigError(str(run_dir), "resume", f"this run finished at step {done['steps']} (summary.json); "
                          "to train it again: preftune train -c RUN/config.yaml run.overwrite=true")
    # ---- validate everything cheap before any weights load ----
    records = load_data(cfg.data.train_path, cfg.data, paired=spec.paired)
    eval_records = load_data(cfg.data.eval_path, cfg.data) if cfg.data.eval_path else None  # always pairs
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    data = prepare_data(cfg, spec, tokenizer, records, eval_records)
    lock = RunLock(run_dir, overwrite=cfg.run.overwrite, resume=resume) if main else None
    try:
        result = _train(cfg, spec, model_dir, tokenizer, data, lock, resume, allow_config_change)
    except BaseException:
        if lock is not None:
            lock.release(ok=False)
        raise
    if lock is not None:
        lock.release()
    return result


def _train(cfg: Config, spec: LossSpec, model_dir: str, tokenizer, data, lock, resume: bool,
           allow_config_change: bool) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t, run_dir, stats, kwargs = cfg.train, Path(cfg.run.output_dir), data.stats, data.kwargs
    ckpt = find_checkpoint(run_dir) if resume else None
    fp = fingerprint(cfg, tokenizer)
    unusable = sorted((run_dir / "checkpoints").glob("step-*")) if resume and ckpt is None else []
    if ckpt is not None:
        check_fingerprint(ckpt.state["fingerprint"], fp, allow_config_change, ckpt.path)
    elif unusable:
        raise ConfigError(str(unusable[-1]), "checkpoint", "no checkpoint in this run verifies (see the lines "
                          "above); remove the checkpoints/ directory to start over")
    elif resume:
        print(f"resume: no valid checkpoint in {run_dir}; starting from step 0")

    # ---- model, reference, optimizer ----
    set_seed(t.seed)
    model, reference, reference_info = _build_policy(cfg, spec, model_dir)
    cfg, layout_info = _exact_layout(cfg, spec, model, data, tokenizer, model_dir)
    if t.autocast_bf16:
        fp32_lm_head(model)
        if isinstance(reference, FrozenCopyReference):
            fp32_lm_head(reference.model)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=not torch.cuda.is_available(),
                              log_with=t.report_to or None, project_dir=str(run_dir))
    ref_cache = {} if t.reference_cache and spec.needs_reference and spec.paired else None
    if ref_cache is not None:  # filled below, once the model sits on its device
        data.collate = pair_collator(cfg, tokenizer, ref_cache)
    sampler = EpochSampler(len(data.examples), t.seed if t.shuffle else None)
    # its own generator: each new iterator draws a seed, which must not consume the global RNG
    # that dropout uses (a resumed run creates one more iterator than an uninterrupted one)
    loader = DataLoader(data.examples, batch_size=t.batch_size, sampler=sampler, collate_fn=data.collate,
                        generator=torch.Generator().manual_seed(t.seed))
    named = _trainable(model)
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    place_reference(reference, accelerator)
    if ref_cache is not None:
        ref_cache.update(reference_cache(cfg, data, accelerator.unwrap_model(model), reference, tokenizer,
                                          reference_info, fp, accelerator))
    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    total_steps = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    # stepped by hand once per optimizer step (not prepared: Accelerate would step it per process)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    step, epoch0, batch0, history = 0, 0, 0, []
    if ckpt is not None:
        load_checkpoint(ckpt, params=named, optimizer=optimizer, scheduler=scheduler)
        step, epoch0, batch0 = ckpt.state["step"], ckpt.state["epoch"], ckpt.state["batches_in_epoch"]
        history = [r for r in _read_metrics(run_dir) if r["step"] <= step]
        print(f"resume: from {ckpt.path} (step {step})")

    # ---- run directory: resolved config before step 0 ----
    main = accelerator.is_main_process
    if main:
        lock.started()  # from here the directory is this run's; an overwritten one is deleted
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", extra={"preftune_version": __version__})
        _write_json(run_dir / "data_stats.json", {**stats.as_dict(), "layout": layout_info})
        _write_json(run_dir / "reference.json", reference_info)
        print(f"data: {stats.pairs} {'pairs' if spec.paired else 'examples'}, {stats.truncated} truncated, "
               f"{stats.dropped} dropped (lines {stats.truncated_lines or '-'}), {stats.dropped_eval_prompts} "
               f"dropped as eval prompts; loss: {spec.name}; reference: {reference_info['strategy']}")
    if t.report_to:
        accelerator.init_trackers("trackers", config=_flat_config(cfg))
    metrics_file = open(run_dir / "metrics.jsonl", "w") if main else None
    for row in history:  # a resumed run keeps the rows up to its checkpoint, bit for bit
        metrics_file.write(json.dumps(row) + "\n")
    collected, start = [], time.perf_counter()
    flagged = {f for r in history for f in r.get("health", [])}
    # a live bar on a terminal; a plain line every 10 steps in logs (CI, pipes)
    dg, stopped = cfg.diagnostics, None
    thresholds = dataclasses.asdict(dg)
    baseline = probe_baseline(accelerator.unwrap_model(model), reference, tokenizer, data, cfg, history)
    bar = tqdm(total=total_steps, initial=step, disable=not main or not sys.stderr.isatty(), desc=spec.name)
    model.train()
    for epoch in range(epoch0, t.epochs):
        if step >= total_steps:
            break
        done = batch0 if epoch == epoch0 else 0  # micro-batches of this epoch already trained
        sampler.position(epoch, skip=done * t.batch_size * accelerator.num_processes)
        for batch in loader:
            with accelerator.accumulate(model):
                losses, parts = loss_forward(model, reference, spec, batch, kwargs, bf16=t.autocast_bf16)
                loss = losses.mean()
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                    if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
                        # stop before optimizer.step: no non-finite weight ever exists
                        what = "loss" if not torch.isfinite(loss) else "grad_norm"
                        last = find_checkpoint(run_dir, log=lambda _: None)
                        raise NumericalError(f"step {step + 1}: {what} is not finite; stopped before the optimizer "
                                             f"step; last good checkpoint: {last.path if last else 'none'}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            collected.append(parts)
            done += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            gathered = {k: accelerator.gather_for_metrics(torch.cat([c[k] for c in collected])) for k in collected[0]}
            collected = []
            row = {"step": step, "epoch": epoch, **step_metrics(gathered, paired=spec.paired),
                   "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
            if dg.probe_every and (step % dg.probe_every == 0 or step == total_steps):
                row.update(run_probe(accelerator.unwrap_model(model), reference, tokenizer, data, spec, cfg, step,
                                  baseline))
            history.append(row)
            row["health"] = health_checks(history, beta=cfg.loss.beta, paired=spec.paired, **thresholds)
            for flag in set(row["health"]) - flagged:  # say it once, when it starts
                flagged.add(flag)
                if main:
                    print(f"health: {flag} at step {step} (see preftune.diagnostics.health_checks)", flush=True)
            stop = next((f for f in row["health"] if f in dg.stop_on), None)
            if main and step % t.log_every == 0:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if t.report_to and step % t.log_every == 0:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total_steps:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(run_dir, step=step, trainable=_trainable(accelerator.unwrap_model(model)),
                                    optimizer=optimizer, scheduler=scheduler, keep_last=t.keep_last,
                                    state={"epoch": epoch, "batches_in_epoch": done, "fingerprint": fp})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}")
            if main and bar.disable and (step % 10 == 0 or step == total_steps):
                print(f"step {step}/{total_steps} loss {row['loss']:.4f} margin {row['rewards/margins']:.3f}",
                       flush=True)
            if stop:
                stopped = {"check": stop, "step": step}
                if main:
                    print(f"stopping early: {stop} at step {step} (diagnostics.stop_on)", flush=True)
            if step >= total_steps or stop:
                break
        if stopped:
            break
    bar.close()
    elapsed = time.perf_counter() - start

    # ---- held-out evaluation and save ----
    summary = {"preftune_version": __version__, "loss": spec.name, "steps": step, "elapsed_s": round(elapsed, 2),
               "pairs_per_s": round(len(history) * t.batch_size * t.grad_accum * accelerator.num_processes
                                    / max(elapsed, 1e-9), 3) if ckpt is None else None,
               "data": stats.as_dict(), "layout": layout_info, "reference": reference_info, "loss_params": kwargs,
               "peak_rss_mb": peak_rss_mb(), "resumed_from": str(ckpt.path) if ckpt else None,
               "health": {f: next(r["step"] for r in history if f in r.get("health", [])) for f in sorted(flagged)},
               "stopped_early": stopped, "final": history[-1] if history else {}}
    if data.eval_pairs is not None:
        from .evaluate import evaluate_pairs

        summary["eval"] = evaluate_pairs(model, reference, spec, data.eval_pairs, loss_kwargs=kwargs,
                                         batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
    accelerator.wait_for_everyone()
    if t.report_to:
        accelerator.end_training()
    if main:
        metrics_file.close()
        final = accelerator.unwrap_model(model)
        assert_finite(_trainable(final), "final model")
        _save_model(final, tokenizer, run_dir / "model")
        _write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, step, summary)


def _flat_config(cfg: Config) -> dict:
    """Scalar settings as `section.key` for tracker hyperparameter tables (lists as text)."""
    return {f"{sec}.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for sec, values in dataclasses.asdict(cfg).items() for k, v in values.items()}


def _read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl_tail_tolerant(run_dir / "metrics.jsonl")
