"""`train(cfg) -> RunResult`: setup, one readable loop on Accelerate, save.

THE loop for every kind of run: offline preference files and online sources (online/source.py)
alike come in as a batch source (batches.py), so online DPO inherits Accelerate, the schedule,
accumulation, the NaN guard, checkpoints and exact resume, probes, health checks and `stop_on`.

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
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, run_name, save_config
from ..core.diagnostics import health_checks, step_metrics
from ..core.logprobs import bf16_enabled, chunk_lm_head, fp32_lm_head
from ..core.losses import LossSpec, build_loss
from ..core.step import loss_forward, loss_kwargs
from ..data.batches import BatchSource, OfflineSource
from ..models.loading import (
    FrozenCopyReference,
    apply_lora,
    build_reference,
    load_model,
    load_reward_start,
    load_start,
    load_tokenizer,
    resolve_model_dir,
    weights_sha256,
)
from ..utils.allocator import release_freed_memory
from ..utils.errors import ConfigError, NumericalError
from ..utils.rundir import RunLock, finished, read_jsonl_tail_tolerant
from ..utils.safeio import atomic_path, atomic_write, os_problem
from ..utils.sharding import (
    enable_fsdp_on_cpu,
    full_model_state,
    full_tensor,
    full_tensors,
    gather_objects,
    init_root,
    is_fsdp,
    loads_on_rank0_only,
    local_state_mb,
    shard_frozen,
    sharded_modules,
)
from ..utils.version import __version__
from .checkpoint import (
    assert_finite,
    check_fingerprint,
    find_checkpoint,
    fingerprint,
    load_checkpoint,
    restore_best,
    save_best,
    save_checkpoint,
    snapshot,
)
from .evaluate import evaluate_pairs
from .probe import probe_baseline, run_probe

__all__ = ["train", "RunResult", "check_output_dir", "tracker_kwargs"]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    summary: dict


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(str(path), "run.output_dir", "already exists and is not empty "
                          "(set run.overwrite=true or choose another directory)")


def _save_model(model, tokenizer, dest: Path, state_dict: dict | None = None) -> None:
    """No half-written model/ ever exists (safeio.atomic_path). `state_dict`: the full weights
    gathered from a sharded model (else the model's own)."""
    with atomic_path(dest, directory=True, replace_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        # PEFT writes a placeholder card naming the local cache directory as the base model; the
        # card to share is the one `preftune export` writes from the run's files
        (tmp / "README.md").write_text("# A preftune run's model\n\nThis is the training run's own model directory. "
                                       "`preftune export RUN --out DIR` writes it with a model card (base model, "
                                       "data, loss, settings, held-out figures) ready to share or push.\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc; None elsewhere): after sharding this is
    what a process holds while it trains, where the peak also counts the load before sharding."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def _build_policy(cfg: Config, spec: LossSpec, model_dir: str, *, empty: bool = False, device: str = "cpu",
                  pad_id: int = 0):
    """Policy (with LoRA if asked), its reference, and what to record about the reference. With
    an SFT adapter merged in, the reference is the SFT-adapted model (adapters off = SFT
    weights); kept trainable, the SFT adapter is the policy and a frozen merged copy the reference.
    `empty`: without weights (a sharded run's rank > 0; rank 0's are broadcast at prepare)."""
    m = cfg.model
    # a reward model (rm.py) is the model with a new score head; it has no reference and no adapter to start from
    model, adapter = (load_reward_start(m, model_dir, pad_id), None) if spec.kind.model == "score_head" \
        else load_start(m, model_dir, empty=empty, device=device)
    separate = spec.needs_reference and bool(m.reference_name_or_path)  # not the starting weights
    kept = adapter is not None and not m.adapter_merge  # the SFT adapter itself keeps training
    info = {"strategy": "none", "weights_sha256": None}
    if spec.needs_reference and not separate:
        # kept: a frozen merged copy is the reference; the PEFT policy keeps its own (unmerged) weights
        start = copy.deepcopy(model).merge_and_unload() if kept else model
        info = {"strategy": "adapters_off" if m.lora and not kept else "frozen_copy",
                "weights_sha256": weights_sha256(start), "model": model_dir, **(adapter or {})}
        if m.load_in_4bit:  # the reference is the 4-bit base: its log-probs are not the full-precision model's
            info["quantization"] = f"4bit-{m.bnb_4bit_quant_type}"
    if m.lora and not kept:
        model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules, task="SEQ_CLS" if spec.kind.model == "score_head" else "CAUSAL_LM")
    if m.gradient_checkpointing:  # non-reentrant: restores the RNG, so dropout masks (and losses) are unchanged
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def place_reference(reference, accelerator, token_id: int) -> None:
    """Put a frozen reference copy where the policy runs. Adapters-off references are the
    policy itself, so DDP/FSDP/DeepSpeed shard them for free. A frozen copy is moved to the
    device under DDP and sharded like the policy under FSDP2 (sharding.shard_frozen); under
    DeepSpeed it is refused: use LoRA, or a reference-free loss."""
    from accelerate.utils import DistributedType  # deferred with Accelerate (see _setup)

    if not isinstance(reference, FrozenCopyReference):
        return
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("accelerate config", "model.lora", "full fine-tuning with a frozen reference copy is not "
                          "supported under DeepSpeed yet; set model.lora=true (the reference is then the policy "
                          "with adapters off) or use a reference-free loss")
    if kind == DistributedType.FSDP:
        reference.model = shard_frozen(accelerator, reference.model)
        init_root(reference.model, token_id)
    else:
        reference.model.to(accelerator.device)


def _trainable(model, modules: dict | None = None) -> dict:
    """Every trainable parameter of the run by name: the policy's, then those of the modules its
    source trains beside it (PPO's critic) as `<key>.<name>`."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for key, module in (modules or {}).items():
        module = getattr(module, "module", module)  # a DDP-wrapped module's own names
        params.update({f"{key}.{name}": p for name, p in module.named_parameters() if p.requires_grad})
    return params


def train(cfg: Config, *, resume: bool = False, allow_config_change: bool = False,
          source: BatchSource | None = None) -> RunResult:
    """Train from `cfg` on `source` (default: the offline file `data.train_path`). With `resume`,
    continue `cfg.run.output_dir` from its newest valid checkpoint (or start fresh there when it
    has none). One writer per run directory (RunLock)."""
    release_freed_memory()  # PREFTUNE_MALLOC=release for train() called as a library (utils/allocator.py)
    spec, run_dir = build_loss(cfg.loss.name, cfg.loss.mix), Path(cfg.run.output_dir)
    # the main process alone decides about (and locks) the run dir: global rank 0, as launchers set
    # it (Accelerate's own state is not built yet, and building it early would fix its settings)
    main = os.environ.get("RANK", "0") == "0"
    if not resume and main:
        check_output_dir(run_dir, cfg.run.overwrite)
    elif resume and (done := finished(run_dir)) is not None:
        raise ConfigError(str(run_dir), "resume", f"this run finished at step {done['steps']} (summary.json); "
                          "to train it again: preftune train -c RUN/config.yaml run.overwrite=true")
    # ---- validate everything cheap before any weights load ----
    if spec.kind.name not in (source or OfflineSource).feeds:
        raise ConfigError("defaults", "loss.name", f"{spec.name!r} trains on {spec.kind.data} "
                          f"({spec.kind.name}): use `preftune {spec.kind.command}`")
    source = source or OfflineSource.load(cfg, spec)
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    source.prepare(tokenizer)
    if cfg.train.keep_best and not source.eval_pairs:
        raise ConfigError("defaults", "train.keep_best", "needs held-out pairs to measure: set data.eval_path")
    lock = RunLock(run_dir, overwrite=cfg.run.overwrite, resume=resume) if main else None
    try:
        run = _setup(cfg, spec, model_dir, tokenizer, source, resume, allow_config_change)
        log = RunLog(run, lock)
        stopped = _loop(run, log)
        result = _finish(run, log, stopped)
    except BaseException:
        if lock is not None:
            lock.release(ok=False)
        raise
    if lock is not None:
        lock.release()
    return result


@dataclass
class _Run:
    """Everything the loop works with, built by `_setup`."""
    cfg: Config
    spec: LossSpec
    tokenizer: object
    source: BatchSource
    accelerator: object
    model: object
    reference: object
    reference_info: dict
    layout_info: dict
    optimizer: object
    scheduler: object
    params: list
    fp: dict
    total_steps: int
    epochs: int
    ckpt: object = None
    step: int = 0
    epoch0: int = 0
    batch0: int = 0
    history: list = field(default_factory=list)
    start: float = 0.0  # perf_counter at the first step of this process's part of the run
    pairs: int = 0  # pairs (or examples) trained by this process's part of the run
    loss_kwargs: dict = field(default_factory=dict)  # the loss's settings, computed once (_setup)
    best: dict | None = None  # train.keep_best: {"step", "accuracy"} of the best probe so far
    modules: dict = field(default_factory=dict)  # what the source trains beside the policy (PPO's critic)
    bf16: bool = False  # train.autocast_bf16 resolved on this run's device (logprobs.bf16_enabled)


def _setup(cfg: Config, spec: LossSpec, model_dir: str, tokenizer, source, resume: bool,
           allow_config_change: bool) -> _Run:
    """Checkpoint to resume (checked against the fingerprint), policy and reference, Accelerate,
    optimizer, the source started, schedule, and the resumed state."""
    from accelerate import Accelerator  # deferred: ~1 s to import, only when a run starts
    from accelerate.utils import set_seed  # see above
    from transformers import get_scheduler  # deferred: ~1 s to import

    t, run_dir = cfg.train, Path(cfg.run.output_dir)
    ckpt = find_checkpoint(run_dir) if resume else None
    fp = {**fingerprint(cfg, tokenizer), **source.identity}
    unusable = sorted((run_dir / "checkpoints").glob("step-*")) if resume and ckpt is None else []
    if ckpt is not None:
        check_fingerprint(ckpt.state["fingerprint"], fp, allow_config_change, ckpt.path)
    elif unusable:
        raise ConfigError(str(unusable[-1]), "checkpoint", "no checkpoint in this run verifies (see the lines "
                          "above); remove the checkpoints/ directory to start over")
    elif resume:
        print(f"resume: no valid checkpoint in {run_dir}; starting from step 0")
    # Accelerate (and its process group) before the weights: under FSDP with cpu_ram_efficient_loading
    # only rank 0 loads them, the other ranks build the structure and get their shards at prepare
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=not torch.cuda.is_available(),
                              log_with=t.report_to or None, project_dir=str(run_dir / "trackers"))
    enable_fsdp_on_cpu(accelerator)
    if is_fsdp(accelerator) and not isinstance(source, OfflineSource):
        raise ConfigError("accelerate config", "distributed_type", "only preference files (preftune train) run "
                          "under FSDP yet (online sources sample on each process; SFT and reward models are untested "
                          "there): launch with DDP (configs/accelerate/ddp.yaml)")
    if is_fsdp(accelerator) and cfg.model.load_in_4bit:
        raise ConfigError("accelerate config", "model.load_in_4bit", "4-bit weights cannot be sharded by FSDP here; "
                          "launch with DDP (configs/accelerate/ddp.yaml) or set model.load_in_4bit=false")
    set_seed(t.seed)
    model, reference, reference_info = _build_policy(cfg, spec, model_dir, empty=loads_on_rank0_only(accelerator),
                                                     device=accelerator.device.type, pad_id=tokenizer.pad_token_id)
    reference_info["weights_sha256"] = gather_objects(reference_info["weights_sha256"])[0]  # rank 0 has them all
    bf16 = bf16_enabled(t.autocast_bf16, accelerator.device.type)
    if bf16:
        fp32_lm_head(model)
        if isinstance(reference, FrozenCopyReference):
            fp32_lm_head(reference.model)
    chunk_lm_head(model, t.logprob_chunk_tokens)  # every log-prob of the run, eval and reference included
    if isinstance(reference, FrozenCopyReference):
        chunk_lm_head(reference.model, t.logprob_chunk_tokens)
    modules = source.modules(cfg, model, reference) if hasattr(source, "modules") else {}  # PPO's critic
    optimizer = torch.optim.AdamW(list(_trainable(model, modules).values()), lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *modules.values())
    modules.update(zip(modules, prepared))  # the source holds this dict: it now runs the prepared modules
    # the prepared (under FSDP: sharded, new) parameters, in the same name order. Accelerate swaps
    # them into the optimizer by data pointer, which parameters without storage (ranks > 0 above)
    # all share; the optimizer holds no state yet, so setting its one group here is exact.
    params = list(_trainable(model, modules).values())
    optimizer.param_groups[0]["params"] = params
    init_root(model, tokenizer.pad_token_id or 0)
    place_reference(reference, accelerator, tokenizer.pad_token_id or 0)
    # checked on the prepared model: on its device, and under FSDP with every rank's forwards together
    chosen, layout_info = source.layout(cfg, accelerator.unwrap_model(model), model_dir)  # the source keeps it
    # the run records the layout that ran (config.yaml, summary): the check's choice, not only what was asked
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout=chosen.layout,
                                                            prefix_sharing=chosen.prefix_sharing))
    per_epoch = source.start(cfg, accelerator.unwrap_model(model), accelerator, reference, reference_info, fp)
    if per_epoch is None:  # an unbounded (online) source: max_steps is the length of the run
        total_steps, epochs = t.max_steps, 1
    else:
        total_steps, epochs = min(t.max_steps or 10**12, math.ceil(per_epoch / t.grad_accum) * t.epochs), t.epochs
    # stepped by hand once per optimizer step (not prepared: Accelerate would step it per process)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    run = _Run(cfg, spec, tokenizer, source, accelerator, model, reference, reference_info, layout_info, optimizer,
               scheduler, params, fp, total_steps, epochs, ckpt, modules=modules, bf16=bf16)
    # the loss's settings from the config, once; a source only adjusts them from its data (KTO's class weights)
    run.loss_kwargs = {**loss_kwargs(cfg, spec), **source.loss_adjustments}
    if ckpt is not None:
        load_checkpoint(ckpt, params=_trainable(accelerator.unwrap_model(model), modules), optimizer=optimizer,
                        scheduler=scheduler)
        run.step, run.epoch0, run.batch0 = ckpt.state["step"], ckpt.state["epoch"], ckpt.state["batches_in_epoch"]
        run.best = ckpt.state.get("best")
        if "loss_state" in run.loss_kwargs:  # the loss's loop state (bco_pair's baseline) as it was at the checkpoint
            run.loss_kwargs["loss_state"].load_state_dict(ckpt.state["loss_state"])
        run.history = [r for r in read_jsonl_tail_tolerant(run_dir / "metrics.jsonl") if r["step"] <= run.step]
        if accelerator.is_main_process:
            print(f"resume: from {ckpt.path} (step {run.step})")
    return run


class RunLog:
    """The run directory's files and what the user sees: config.yaml, data_stats.json and
    reference.json before step 0, one metrics.jsonl row per optimizer step (with its health
    checks, said once when they start), tracker logs, and the progress bar or plain lines."""

    def __init__(self, run: _Run, lock):
        cfg, t, a = run.cfg, run.cfg.train, run.accelerator
        self.run, self.main, self.t, self.dg = run, a.is_main_process, t, cfg.diagnostics
        self.run_dir = Path(cfg.run.output_dir)
        if self.main:
            lock.started()  # from here the directory is this run's; an overwritten one is deleted
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml", extra={"preftune_version": __version__})
            _write_json(self.run_dir / "data_stats.json", {**run.source.stats, "layout": run.layout_info})
            _write_json(self.run_dir / "reference.json", run.reference_info)
            print(f"data: {run.source.describe()}; loss: {run.spec.name}; reference: {run.reference_info['strategy']}")
            if a.num_processes > 1:
                kind = str(a.distributed_type).split(".")[-1].lower()
                print(f"processes: {a.num_processes} ({kind}); global batch "
                      f"{t.batch_size * a.num_processes * t.grad_accum} pairs per step")
        if t.report_to:
            a.init_trackers(t.tracker_project, config=_flat_config(cfg),
                            init_kwargs=tracker_kwargs(t.report_to, run_name(cfg)))
        self.metrics = open(self.run_dir / "metrics.jsonl", "w") if self.main else None
        for row in run.history if self.main else []:  # a resumed run keeps the rows up to its checkpoint, bit for bit
            self._append(row)
        self.flagged = {f for r in run.history for f in r.get("health", [])}
        # a live bar on a terminal; a plain line every 10 steps in logs (CI, pipes)
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not self.main or not sys.stderr.isatty(),
                        desc=run.spec.name)

    def _append(self, row: dict, *, flush: bool = False) -> None:
        """One metrics.jsonl line; a full disk names the file (it was exit 1 naming nothing)."""
        try:
            self.metrics.write(json.dumps(row) + "\n")
            if flush:
                self.metrics.flush()
        except OSError as err:
            raise ConfigError(str(self.run_dir / "metrics.jsonl"), "metrics.jsonl", f"not written: {os_problem(err)}; "
                              "the newest checkpoint (if any) resumes the run") from None

    def record(self, row: dict) -> str | None:
        """Append one step's row (health checks added); returns the stop_on check that fired, if any."""
        run, step, main = self.run, row["step"], self.main
        run.history.append(row)
        # a reward model's margins are score gaps, not beta-scaled log-ratios
        beta = run.cfg.loss.beta if run.spec.kind.margins == "beta" else 1.0
        row["health"] = health_checks(run.history, beta=beta, paired=run.spec.kind.data == "pairs",
                                      **dataclasses.asdict(self.dg))
        for flag in set(row["health"]) - self.flagged:  # say it once, when it starts
            self.flagged.add(flag)
            if main:
                print(f"health: {flag} at step {step} (see preftune.diagnostics.health_checks)", flush=True)
        if main and step % self.t.log_every == 0:
            self._append(row, flush=True)
        if self.t.report_to and step % self.t.log_every == 0:
            run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        self.bar.update(1)
        name, key = run.spec.kind.progress  # pairs: the margin; rollouts: the mean reward; demonstrations: NLL/token
        shown = f"{row[key]:.3f}" if key in row else "-"  # a KTO step of one class has no margin
        self.bar.set_postfix({"loss": f"{row['loss']:.4f}", name: shown})
        if main and self.bar.disable and (step % 10 == 0 or step == run.total_steps):
            print(f"step {step}/{run.total_steps} loss {row['loss']:.4f} {name} {shown}", flush=True)
        stop = next((f for f in row["health"] if f in self.dg.stop_on), None)
        if stop and main:
            print(f"stopping early: {stop} at step {step} (diagnostics.stop_on)", flush=True)
        return stop

    def close(self) -> None:
        self.bar.close()
        if self.t.report_to:
            self.run.accelerator.end_training()
        if self.metrics is not None:
            self.metrics.close()


def _loop(run: _Run, log: RunLog) -> dict | None:
    """Micro-batches from the source until total_steps (or a stop_on check); returns the stop."""
    cfg, t, a, model, spec = run.cfg, run.cfg.train, run.accelerator, run.model, run.spec
    run_dir, collected = Path(cfg.run.output_dir), []
    unwrapped = a.unwrap_model(model)
    # measured once per run; a resumed run takes it from its checkpoint (without a reference it could
    # only re-measure the trained weights, not the starting ones)
    baseline = run.ckpt.state.get("probe_reference_length") if run.ckpt is not None else None
    probing = bool(cfg.diagnostics.probe_every) and spec.kind.samples  # a reward model cannot sample
    if baseline is None and probing:
        baseline = probe_baseline(unwrapped, run.reference, run.tokenizer, run.source, cfg, run.history,
                                  run.total_steps)
    run.start, run.pairs = time.perf_counter(), 0
    model.train()
    for epoch in range(run.epoch0, run.epochs):
        if run.step >= run.total_steps:
            break
        done = run.batch0 if epoch == run.epoch0 else 0  # micro-batches of this epoch already trained
        for batch in run.source.batches(epoch, skip=done):
            with a.accumulate(model):
                losses, parts = loss_forward(model, run.reference, spec, batch, run.loss_kwargs, bf16=run.bf16)
                loss = losses.mean()
                a.backward(loss)
                grad_norm = None
                if a.sync_gradients:
                    grad_norm = full_tensor(a.clip_grad_norm_(run.params, t.max_grad_norm or float("inf")))
                    if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
                        # stop before optimizer.step: no non-finite weight ever exists
                        what = "loss" if not torch.isfinite(loss) else "grad_norm"
                        last = find_checkpoint(run_dir, log=lambda _: None)
                        raise NumericalError(f"step {run.step + 1}: {what} is not finite; stopped before the "
                                             f"optimizer step; last good checkpoint: {last.path if last else 'none'}")
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            collected.append(parts)
            done += 1
            if not a.sync_gradients:
                continue
            run.scheduler.step()
            run.step += 1
            gathered = {k: a.gather_for_metrics(torch.cat([c[k] for c in collected])) for k in collected[0]}
            collected, run.pairs = [], run.pairs + len(gathered["losses"])
            row = {"step": run.step, "epoch": epoch, **step_metrics(gathered, spec.kind),
                   "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0], **run.source.step_metrics()}
            if probing and (run.step % cfg.diagnostics.probe_every == 0
                                                or run.step == run.total_steps):
                row.update(run_probe(unwrapped, run.reference, run.tokenizer, run.source, spec, run.loss_kwargs, cfg,
                                     run.step,
                                     baseline, run.total_steps))
            stop = log.record(row)
            if not stop:  # a probe that stops the run is not a state to end at
                _keep_if_best(run, row, unwrapped)
            if t.checkpoint_every and run.step % t.checkpoint_every == 0 and run.step < run.total_steps:
                snap = snapshot(_trainable(unwrapped, run.modules), run.optimizer)  # every rank: gathers sharded tensors
                if a.is_main_process:
                    save_checkpoint(run_dir, step=run.step, snap=snap, scheduler=run.scheduler, keep_last=t.keep_last,
                                    state={"epoch": epoch, "batches_in_epoch": done, "fingerprint": run.fp,
                                           "probe_reference_length": baseline, "best": run.best, **_loss_state(run)})
                a.wait_for_everyone()
            if stop:
                return {"check": stop, "step": run.step}
            if run.step >= run.total_steps:
                return None
    return None


def _loss_state(run: _Run) -> dict:
    """{"loss_state": its numbers} for a loss that keeps loop state (checkpoints, summary.json), else {}."""
    state = run.loss_kwargs.get("loss_state")
    return {} if state is None else {"loss_state": state.state_dict()}


def _keep_if_best(run: _Run, row: dict, unwrapped) -> None:
    """train.keep_best: a probe with a strictly higher held-out accuracy than every earlier one
    keeps its weights (RUN/best/) and becomes the point the run ends at. Not called for a probe at
    which a diagnostics.stop_on check fires: its accuracy may be the highest while its KL or
    log-probs are the reason to stop, and ending there would hand back the state that was refused."""
    accuracy = row.get("probe/eval_accuracy")
    if not run.cfg.train.keep_best or accuracy is None or (run.best is not None and accuracy <= run.best["accuracy"]):
        return
    tensors = full_tensors(_trainable(unwrapped, run.modules))  # every rank: gathers sharded tensors
    if run.accelerator.is_main_process:
        save_best(Path(run.cfg.run.output_dir), run.step, tensors)
    run.accelerator.wait_for_everyone()
    run.best = {"step": run.step, "accuracy": accuracy}


def _finish(run: _Run, log: RunLog, stopped: dict | None) -> RunResult:
    """Summary, held-out evaluation, and the final model (written whole or not at all)."""
    cfg, a, history, step = run.cfg, run.accelerator, run.history, run.step
    restored = bool(cfg.train.keep_best and run.best and run.best["step"] != step)
    if restored:  # end at the best probe: its weights are evaluated and saved, not the last step's
        restore_best(Path(cfg.run.output_dir), run.best["step"], _trainable(a.unwrap_model(run.model), run.modules))
        if a.is_main_process:
            print(f"keep_best: restored the weights of step {run.best['step']} (held-out probe accuracy "
                  f"{run.best['accuracy']:.3f})", flush=True)
    elapsed = time.perf_counter() - run.start
    summary = {"preftune_version": __version__, "loss": run.spec.name, "steps": step, "elapsed_s": round(elapsed, 2),
               "pairs_per_s": round(run.pairs / max(elapsed, 1e-9), 3) if run.ckpt is None else None,
               "data": run.source.stats, "layout": run.layout_info, "reference": run.reference_info,
               "loss_params": {k: v for k, v in run.loss_kwargs.items()
                               if not isinstance(v, torch.nn.Module) and k != "loss_state"},
               **_loss_state(run),
               "peak_rss_mb": peak_rss_mb(), "allocator": release_freed_memory(), "autocast_bf16": run.bf16,
               "distributed": {"type": str(a.distributed_type).split(".")[-1].lower(), "processes": a.num_processes},
               "gradient_checkpointing": bool(getattr(a.unwrap_model(run.model), "is_gradient_checkpointing", False)),
               "quantization": f"4bit-{cfg.model.bnb_4bit_quant_type}" if cfg.model.load_in_4bit else None,
               "resumed_from": str(run.ckpt.path) if run.ckpt else None,
               "health": {f: next(r["step"] for r in history if f in r.get("health", [])) for f in sorted(log.flagged)},
               "stopped_early": stopped, "final": history[-1] if history else {},
               "best": {**run.best, "restored": restored} if cfg.train.keep_best and run.best else None}
    # a source with its own held-out measure (GRPO: held-out reward of fresh samples) says so here
    held_out = run.source.evaluate(a.unwrap_model(run.model), run.reference) if hasattr(run.source, "evaluate") else None
    if held_out is not None:
        summary["eval"] = held_out
    elif run.source.eval_pairs is not None:
        summary["eval"] = evaluate_pairs(run.model, run.reference, run.spec, run.source.eval_pairs,
                                         loss_kwargs=run.loss_kwargs, batch_size=cfg.eval.batch_size,
                                         pad_id=run.tokenizer.pad_token_id, collate=run.source.eval_collate)
    # per process: what sharding saves shows here (the peak includes loading the whole model once)
    summary["peak_rss_mb_per_process"] = gather_objects(peak_rss_mb())
    summary["rss_mb_per_process"] = gather_objects(rss_mb())
    ref_model = getattr(run.reference, "model", None) if isinstance(run.reference, FrozenCopyReference) else None
    summary["model_state_mb_per_process"] = gather_objects(
        local_state_mb([run.model, *([ref_model] if ref_model is not None else [])], run.optimizer))
    if is_fsdp(a):
        summary["distributed"]["sharded_modules"] = sharded_modules(run.model)
    a.wait_for_everyone()
    log.close()
    run_dir = Path(cfg.run.output_dir)
    final = a.unwrap_model(run.model)
    gathered = full_model_state(run.model) if is_fsdp(a) else None  # every rank: full weights on rank 0
    if a.is_main_process:
        trainable = {k: gathered[k] for k in _trainable(final)} if gathered is not None else _trainable(final)
        assert_finite(trainable, "final model")
        _save_model(final, run.tokenizer, run_dir / "model", state_dict=gathered)
        _write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, step, summary)


# the keyword each tracker takes a run's name under (Accelerate hands train.tracker_project to all of
# them as the project). TensorBoard's runs are directories, and the run's own is under the run; the
# others (comet_ml, aim, dvclive) have no run-name setting there and get the project only.
_RUN_NAME_KEY = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "clearml": "task_name"}


def tracker_kwargs(report_to: list, name: str) -> dict:
    """Accelerate's `init_kwargs`: {tracker: {its run-name keyword: name}} for the trackers asked for."""
    wanted = _RUN_NAME_KEY if "all" in report_to else [t for t in report_to if t in _RUN_NAME_KEY]
    return {t: {_RUN_NAME_KEY[t]: name} for t in wanted}


def _flat_config(cfg: Config) -> dict:
    """Scalar settings as `section.key` for tracker hyperparameter tables (lists as text)."""
    return {f"{sec}.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for sec, values in dataclasses.asdict(cfg).items() for k, v in values.items()}

