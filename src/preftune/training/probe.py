"""The in-training probe: every `diagnostics.probe_every` steps, sample from the policy (length,
KL to the reference) and score a slice of the held-out pairs; the health checks read its rows."""

from __future__ import annotations

from ..models.generate import sample_completions
from .evaluate import evaluate_pairs, kl_estimate

__all__ = ["probe", "reference_sample_length", "probe_baseline", "run_probe"]


def _mean_length(samples) -> float:
    return sum(len(c) for _, c in samples) / max(len(samples), 1)


def probe(model, reference, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, seed: int,
          eval_pairs=None, spec=None, loss_kwargs=None, batch_size: int = 8,
          reference_length: float | None = None, collate=None) -> dict:
    """What the in-training probe logs: one sample per prompt from the policy, its mean length,
    KL(policy || reference) on those samples (when there is a reference) and, with eval pairs,
    held-out implicit-reward accuracy and margin. `reference_length` (mean length of the
    reference's samples, measured once at the start) is repeated in every probe row."""
    pad = tokenizer.pad_token_id
    samples = sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, seed=seed)
    row = {"probe/sample_length": _mean_length(samples)}
    if reference_length is not None:
        row["probe/reference_length"] = reference_length
    if reference is not None:
        kl = kl_estimate(model, reference, samples, pad_id=pad)
        row.update({"probe/kl": kl["kl"], "probe/kl_stderr": kl["kl_stderr"]})
    if eval_pairs:
        ev = evaluate_pairs(model, reference, spec, eval_pairs, loss_kwargs=loss_kwargs, batch_size=batch_size,
                            pad_id=pad, collate=collate, desc="probe")
        row.update({"probe/eval_accuracy": ev["accuracy/implicit_reward"], "probe/eval_margin": ev["rewards/margins"]})
    return row


def reference_sample_length(model, reference, tokenizer, prompts, *, max_new_tokens: int, seed: int) -> float:
    """Mean length of samples from the reference (the policy with adapters off or the frozen
    copy); without a reference, from the model as it is now (step 0 of a fresh run)."""
    if reference is None:
        return _mean_length(sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens,
                                               seed=seed))
    with reference.context():
        ref_model = reference.forward_model(model)
        return _mean_length(sample_completions(ref_model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens,
                                               seed=seed))


def probe_prompt_count(setting: int, total_steps: int) -> int:
    """diagnostics.probe_prompts, or for -1: 8 for a run of 16 steps or more (every benchmark run so
    far), a quarter of the steps (at least 2) for a toy run. Measured on the README quickstart (8
    steps, default model, 2 CPU cores): the baseline and final probe on 8 prompts were 12 s of a
    30.5 s run."""
    return setting if setting >= 1 else 8 if total_steps >= 16 else max(2, total_steps // 4)


def probe_baseline(model, reference, tokenizer, source, cfg, history: list[dict], total_steps: int) -> float | None:
    """Mean reference sample length for length_drift: measured once per run (a resumed run
    reads it back from its probe rows). `source` is the run's batch source (batches.py)."""
    if not cfg.diagnostics.probe_every:
        return None
    done = [r["probe/reference_length"] for r in history if "probe/reference_length" in r]
    if done:
        return done[0]
    n = probe_prompt_count(cfg.diagnostics.probe_prompts, total_steps)
    return reference_sample_length(model, reference, tokenizer, source.probe_prompts(n),
                                   max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed)


def run_probe(model, reference, tokenizer, source, spec, loss_kwargs: dict, cfg, step: int, baseline,
              total_steps: int) -> dict:
    n = probe_prompt_count(cfg.diagnostics.probe_prompts, total_steps)
    return probe(model, reference, tokenizer, source.probe_prompts(n),
                 max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed + step,
                 eval_pairs=(source.eval_pairs or [])[: cfg.diagnostics.probe_eval_pairs], spec=spec,
                 loss_kwargs=loss_kwargs, batch_size=cfg.eval.batch_size, reference_length=baseline,
                 collate=source.eval_collate)
