"""Held-out evaluation: preference accuracy, margins, and KL(policy || reference) on samples.

`preftune eval` evaluates a trained run (policy = run's model, reference = its base) or, with
no run, the base model itself ("before": policy == reference, so implicit-reward accuracy is
undefined and only raw log-prob accuracy is meaningful).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .data import collate_pairs
from .data.collate import collate_sequences
from .logprobs import completion_logps, split_pairs

__all__ = ["evaluate_pairs", "sample_completions", "kl_estimate", "run_eval", "load_run_policy"]


@torch.no_grad()
def evaluate_pairs(model, reference, spec, pairs, *, beta: float, batch_size: int, pad_id: int) -> dict:
    """Accuracy by implicit reward (margin > 0) and by raw completion logp, over held-out pairs."""
    was_training = model.training
    model.eval()
    totals = {"margin_correct": 0.0, "logp_correct": 0.0, "margin": 0.0, "chosen_reward": 0.0,
              "rejected_reward": 0.0, "loss": 0.0, "logps_chosen": 0.0, "logps_rejected": 0.0}
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i: i + batch_size], pad_id)
        logps, _ = completion_logps(model, batch)
        pc, pr = split_pairs(logps)
        if reference is not None:
            with reference.context():
                rc, rr = split_pairs(completion_logps(reference.forward_model(model), batch)[0])
        else:
            rc = rr = torch.zeros_like(pc)
        out = spec.fn(pc, pr, rc, rr, beta=beta)
        margins = out.chosen_rewards - out.rejected_rewards
        totals["margin_correct"] += (margins > 0).float().sum().item()
        totals["logp_correct"] += (pc > pr).float().sum().item()
        totals["margin"] += margins.sum().item()
        totals["chosen_reward"] += out.chosen_rewards.sum().item()
        totals["rejected_reward"] += out.rejected_rewards.sum().item()
        totals["loss"] += out.losses.sum().item()
        totals["logps_chosen"] += pc.sum().item()
        totals["logps_rejected"] += pr.sum().item()
    model.train(was_training)
    n = len(pairs)
    return {"pairs": n, "accuracy/implicit_reward": totals["margin_correct"] / n,
            "accuracy/logp": totals["logp_correct"] / n, "rewards/margins": totals["margin"] / n,
            "rewards/chosen": totals["chosen_reward"] / n, "rewards/rejected": totals["rejected_reward"] / n,
            "loss": totals["loss"] / n, "logps/chosen": totals["logps_chosen"] / n,
            "logps/rejected": totals["logps_rejected"] / n}


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, seed: int,
                       temperature: float = 1.0, batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """`n` samples per prompt, pure sampling (no top-k/top-p, so KL estimates stay unbiased).

    Returns (prompt_ids, completion_ids) with completions cut after the first EOS (kept).
    """
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    jobs = [p for p in prompts for _ in range(n)]
    results = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i: i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos)
        for prompt, row in zip(chunk, out[:, width:].tolist()):
            completion = row[: row.index(eos) + 1] if eos in row else row
            results.append((prompt, completion))
    model.train(was_training)
    return results


@torch.no_grad()
def kl_estimate(model, reference, samples, *, pad_id: int, batch_size: int = 16) -> dict:
    """Monte-Carlo KL(policy || reference): mean over policy samples of sum_t log pi/pi_ref."""
    diffs = []
    for i in range(0, len(samples), batch_size):
        chunk = [s for s in samples[i: i + batch_size] if s[1]]
        if not chunk:
            continue
        batch = collate_sequences([p for p, _ in chunk], [c for _, c in chunk], pad_id)
        policy, _ = completion_logps(model, batch)
        with reference.context():
            ref, _ = completion_logps(reference.forward_model(model), batch)
        diffs.append(policy - ref)
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    n = d.numel()
    return {"kl": d.mean().item() if n else 0.0,
            "kl_stderr": (d.std().item() / math.sqrt(n)) if n > 1 else 0.0, "kl_samples": n}


def load_run_policy(run_dir: Path, base_model, *, is_trainable: bool = False):
    """Attach a run's saved adapter to `base_model`, or load its full model dir."""
    model_dir = run_dir / "model"
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(model_dir), is_trainable=is_trainable)
    from .models import load_model

    return load_model(str(model_dir))


def run_eval(cfg, *, run_dir: str | None, data_path: str) -> dict:
    """Evaluate the run's policy (or the base model when `run_dir` is None) on `data_path`."""
    from .losses import LOSSES
    from .models import FrozenCopyReference, load_model, load_tokenizer, resolve_model_dir
    from .train import load_data, prepare_pairs

    m, spec = cfg.model, LOSSES[cfg.loss.name]
    records = load_data(data_path, cfg.data)  # bad data fails here, before any weights load
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code)
    pairs, stats = prepare_pairs(data_path, cfg, tokenizer, records)
    base = load_model(model_dir, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                      allow_pickle_weights=m.allow_pickle_weights)
    if run_dir is None:
        policy, reference = base, FrozenCopyReference(base)  # policy == reference: "before training"
    elif (Path(run_dir) / "model" / "adapter_config.json").is_file():
        from .models import AdaptersOffReference

        policy = load_run_policy(Path(run_dir), base)
        reference = AdaptersOffReference(policy)
    else:
        policy, reference = load_run_policy(Path(run_dir), base), FrozenCopyReference(base)
    policy.eval()
    result = {"run": run_dir or "(base model)", "data": data_path, "data_stats": stats.as_dict(),
              **evaluate_pairs(policy, reference, spec, pairs, beta=cfg.loss.beta, batch_size=cfg.eval.batch_size,
                               pad_id=tokenizer.pad_token_id)}
    e = cfg.eval
    if e.kl_prompts:
        samples = sample_completions(policy, tokenizer, [p.prompt_ids for p in pairs[: e.kl_prompts]],
                                     n=e.kl_samples, max_new_tokens=e.max_new_tokens, seed=cfg.train.seed)
        result.update(kl_estimate(policy, reference, samples, pad_id=tokenizer.pad_token_id))
    return result


def write_json(result: dict, out: str | None) -> str:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    return text
