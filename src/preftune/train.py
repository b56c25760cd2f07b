"""`train(cfg) -> RunResult`: setup, one readable loop on Accelerate, save.

The run directory holds config.yaml (written before step 0), data_stats.json, reference.json,
metrics.jsonl (one line per optimizer step), summary.json and model/ (a PEFT adapter dir or
an HF model dir, safetensors). Errors in data or config surface before any weights load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import __version__
from .config import Config, save_config
from .data import collate_pairs, load_records, tokenize_records
from .diagnostics import step_metrics
from .errors import ConfigError, NumericalError
from .logprobs import completion_logps, split_pairs
from .losses import LOSSES, LossSpec
from .models import apply_lora, build_reference, load_model, load_tokenizer, resolve_model_dir, weights_sha256

__all__ = ["train", "RunResult", "pair_forward", "load_data", "prepare_pairs", "check_output_dir"]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    summary: dict


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError("run.output_dir", str(path), "already exists and is not empty "
                          "(set run.overwrite=true or choose another directory)")


def load_data(path: str, d) -> list:
    """Read and validate one data file with a `DataConfig`'s settings (no tokenizer needed)."""
    return load_records(path, fmt=d.format, column_map=d.column_map, max_records=d.max_records,
                        allow_degenerate=d.allow_degenerate, allow_empty_completions=d.allow_empty_completions)


def prepare_pairs(path: str, cfg: Config, tokenizer, records: list | None = None):
    """Load (unless given), validate and tokenize one data file with the config's data settings."""
    d = cfg.data
    records = load_data(path, d) if records is None else records
    return tokenize_records(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                            drop_overlong=d.drop_overlong, allow_degenerate=d.allow_degenerate)


def pair_forward(model, reference, spec: LossSpec, batch: dict, *, beta: float):
    """One concatenated policy forward (and a no-grad reference forward when the loss needs it)."""
    if spec.needs_reference:
        with torch.no_grad(), reference.context():
            ref_logps, _ = completion_logps(reference.forward_model(model), batch)
        reference_chosen, reference_rejected = split_pairs(ref_logps)
    else:  # reference-free losses never run (or load) a reference
        reference_chosen = reference_rejected = torch.zeros(batch["input_ids"].size(0) // 2)
    logps, counts = completion_logps(model, batch)
    policy_chosen, policy_rejected = split_pairs(logps)
    out = spec.fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)
    return out, (policy_chosen, policy_rejected), split_pairs(counts)


def _save_model(model, tokenizer, dest: Path) -> None:
    """Write to a temp dir beside `dest`, then rename: no half-written model/ ever exists."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def train(cfg: Config) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    spec, t, run_dir = LOSSES[cfg.loss.name], cfg.train, Path(cfg.run.output_dir)
    if not cfg.data.train_path:
        raise ConfigError("defaults", "data.train_path", "is required")
    check_output_dir(run_dir, cfg.run.overwrite)
    # ---- validate everything cheap before any weights load ----
    records = load_data(cfg.data.train_path, cfg.data)
    eval_records = load_data(cfg.data.eval_path, cfg.data) if cfg.data.eval_path else None
    m = cfg.model
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code)
    pairs, stats = prepare_pairs(cfg.data.train_path, cfg, tokenizer, records)
    eval_pairs = prepare_pairs(cfg.data.eval_path, cfg, tokenizer, eval_records)[0] if eval_records else None

    # ---- model, reference, optimizer ----
    set_seed(t.seed)
    model = load_model(model_dir, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                       allow_pickle_weights=m.allow_pickle_weights)
    reference_info = {"strategy": "none", "weights_sha256": None}
    if spec.needs_reference:
        reference_info = {"strategy": "adapters_off" if m.lora else "frozen_copy",
                          "weights_sha256": weights_sha256(model), "model": model_dir}
    if m.lora:
        model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules)
    reference = build_reference(model, lora=m.lora) if spec.needs_reference else None
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=not torch.cuda.is_available())
    generator = torch.Generator().manual_seed(t.seed)
    loader = DataLoader(pairs, batch_size=t.batch_size, shuffle=True, generator=generator,
                        collate_fn=partial(collate_pairs, pad_id=tokenizer.pad_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    total_steps = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    # stepped by hand once per optimizer step (not prepared: Accelerate would step it per process)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)

    # ---- run directory: resolved config before step 0 ----
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", extra={"preftune_version": __version__})
        _write_json(run_dir / "data_stats.json", stats.as_dict())
        _write_json(run_dir / "reference.json", reference_info)
        print(f"data: {stats.pairs} pairs, {stats.truncated} truncated, {stats.dropped} dropped "
              f"(lines {stats.truncated_lines or '-'}); reference: {reference_info['strategy']}")
    metrics_file = open(run_dir / "metrics.jsonl", "w") if main else None
    step, collected, history, start = 0, [], [], time.perf_counter()
    # a live bar on a terminal; a plain line every 10 steps in logs (CI, pipes)
    bar = tqdm(total=total_steps, disable=not main or not sys.stderr.isatty(), desc=spec.name, dynamic_ncols=True)
    model.train()
    for epoch in range(t.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                out, (pc, pr), (nc, nr) = pair_forward(model, reference, spec, batch, beta=cfg.loss.beta)
                loss = out.losses.mean()
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                    if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
                        # stop before optimizer.step: no non-finite weight ever exists
                        what = "loss" if not torch.isfinite(loss) else "grad_norm"
                        raise NumericalError(f"step {step + 1}: {what} is not finite; stopped before the "
                                             f"optimizer step, nothing saved after step {step}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            collected.append([x.detach() for x in (out.losses, out.chosen_rewards, out.rejected_rewards,
                                                   pc, pr, nc, nr)])
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            gathered = [accelerator.gather_for_metrics(torch.cat(parts)) for parts in zip(*collected)]
            collected = []
            row = {"step": step, "epoch": epoch, **step_metrics(*gathered),
                   "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                   "elapsed_s": round(time.perf_counter() - start, 3)}
            history.append(row)
            if main and step % t.log_every == 0:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            if main and bar.disable and (step % 10 == 0 or step == total_steps):
                print(f"step {step}/{total_steps} loss {row['loss']:.4f} margin {row['rewards/margins']:.3f} "
                      f"acc {row['rewards/accuracies']:.2f}", flush=True)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start

    # ---- held-out evaluation and save ----
    summary = {"preftune_version": __version__, "loss": spec.name, "steps": step, "elapsed_s": round(elapsed, 2),
               "pairs_per_s": round(step * t.batch_size * t.grad_accum * accelerator.num_processes / elapsed, 3),
               "data": stats.as_dict(), "reference": reference_info,
               "final": history[-1] if history else {}}
    if eval_pairs is not None:
        from .evaluate import evaluate_pairs

        summary["eval"] = evaluate_pairs(model, reference, spec, eval_pairs, beta=cfg.loss.beta,
                                         batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
    accelerator.wait_for_everyone()
    if main:
        metrics_file.close()
        _save_model(accelerator.unwrap_model(model), tokenizer, run_dir / "model")
        _write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, step, summary)
