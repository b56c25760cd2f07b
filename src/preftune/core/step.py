"""One loss step's arithmetic, shared by training, evaluation, probes and every online source:
the policy (and reference) forward over a collated batch, and the loss's settings."""

from __future__ import annotations

import contextlib

import torch

from .logprobs import (
    autocast,
    completion_logps,
    completion_token_logps,
    pair_logps,
    sequence_scores,
    split_pairs,
)
from .losses import INPUTS, LossSpec

__all__ = ["loss_forward", "loss_kwargs", "SameAsPolicy", "pairs_forward", "score_forward", "unpaired_forward",
           "demonstrations_forward", "rollout_forward", "policy_gradient_forward", "completion_values", "spread"]


class SameAsPolicy:
    """A reference that *is* the policy (a base model evaluated "before training"): its
    log-probs are the policy's own, so `loss_forward` runs one forward, not two, and every
    implicit-reward margin is exactly 0."""

    def context(self):
        return contextlib.nullcontext()

    def forward_model(self, policy):
        return policy


def loss_kwargs(cfg, spec: LossSpec) -> dict:
    """The loss's own settings (its params dataclass fields) out of a config's `loss` section, and
    a fresh loop state under "loss_state" for a loss that keeps one (bco_pair's baseline; the loop
    saves and restores it, the pairs forward updates it on training steps)."""
    kwargs = {name: getattr(cfg.loss, name) for name in spec.params}
    if spec.state:
        kwargs["loss_state"] = spec.new_state()
    return kwargs


def loss_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, *, bf16: bool = False):
    """One micro-batch through the loss's kind's forward: one concatenated policy forward (plus a
    no-grad reference forward when the loss needs one).

    Returns the per-example losses and a dict of detached per-example tensors for the metrics.
    Paired batches are [chosen..., rejected...]; unpaired ones [examples..., KL rows...];
    demonstrations (SFT) [examples...]; rollouts one row per sampled completion.
    """
    return spec.kind.forward(model, reference, spec, batch, kwargs, batch["input_ids"].device.type, bf16)


def _halves(model, reference, spec: LossSpec, batch: dict, device: str, bf16: bool, score=None):
    """The policy's scores of the two halves of a batch, their completion lengths, the
    reference's log-probs of the same rows (cached, the policy's own, a live forward, or zeros),
    and the loss's `inputs` by keyword (INPUTS), computed from per-token log-probs only when asked."""
    tails, weights = "tail_logps" in spec.inputs, "wpo_weights" in spec.inputs
    with autocast(device, bf16):
        if tails or weights:
            logps, counts, extras = pair_logps(model, batch, tails=tails, wpo_weights=weights)
        else:
            (logps, counts), extras = (score or completion_logps)(model, batch), {}
    first, second = split_pairs(logps)
    first_n, second_n = split_pairs(counts)
    ref_tails = None
    # cached sums hold no tails (train.reference_cache is refused for such losses; eval's reused
    # reference log-probs are then recomputed live)
    if "reference_logps" in batch and not tails:  # cached once for the whole run (refcache.py)
        ref_first, ref_second = split_pairs(batch["reference_logps"])
    elif isinstance(reference, SameAsPolicy):
        ref_first, ref_second = first.detach(), second.detach()
        ref_tails = extras["tail_logps"].detach() if tails else None
    elif spec.needs_reference:
        with torch.no_grad(), reference.context(), autocast(device, bf16):
            ref_model = reference.forward_model(model)
            ref_logps, _, ref_extras = pair_logps(ref_model, batch, tails=True) if tails \
                else (*completion_logps(ref_model, batch), {})
        ref_first, ref_second = split_pairs(ref_logps)
        ref_tails = ref_extras.get("tail_logps")
    else:  # reference-free losses never run (or load) a reference
        ref_first = ref_second = torch.zeros_like(first)
    inputs = {}
    if tails:  # policy chosen, policy rejected, reference chosen, reference rejected
        inputs.update(zip(INPUTS["tail_logps"], (*split_pairs(extras["tail_logps"]), *split_pairs(ref_tails))))
    if weights:
        inputs.update(zip(INPUTS["wpo_weights"], split_pairs(extras["wpo_weights"])))
    return first, second, first_n, second_n, ref_first, ref_second, inputs


def _finish(out, parts: dict):
    n = out.losses.size(0)
    extras = {k: v.expand(n) if v.dim() == 0 else v for k, v in out.metrics.items()}
    return out.losses, {k: v.detach() for k, v in {"losses": out.losses, **parts, **extras}.items()}


def pairs_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool,
                  score=None):
    """(prompt, chosen, rejected): the loss on the two completions' log-probs and the reference's.
    A loss that keeps loop state (`spec.state`, in kwargs["loss_state"]) has it updated with this
    micro-batch on training steps (the model in train mode, gradients on), before its value is
    read; evaluation and probes read it unchanged."""
    first, second, first_n, second_n, ref_first, ref_second, inputs = _halves(model, reference, spec, batch, device,
                                                                              bf16, score)
    kwargs = {**kwargs, **inputs}
    if spec.needs_lengths:
        kwargs.update(chosen_lengths=first_n, rejected_lengths=second_n)
    state = kwargs.pop("loss_state", None)
    if spec.state:
        if state is None:
            raise ValueError(f"{spec.name!r} keeps loop state: pass the loss_state that step.loss_kwargs makes")
        if model.training and torch.is_grad_enabled():
            state.observe(first, second, ref_first, ref_second, beta=kwargs["beta"])
        kwargs.update(state.inputs(first.device))
    out = spec.fn(first, second, ref_first, ref_second, **kwargs)
    parts = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
             "policy_chosen": first, "policy_rejected": second, "chosen_lengths": first_n,
             "rejected_lengths": second_n}
    if spec.needs_reference:  # policy - reference on the same pairs: what both_logps_falling reads
        parts.update(logratio_chosen=first - ref_first, logratio_rejected=second - ref_second,
                     reference_chosen=ref_first, reference_rejected=ref_second)
    return _finish(out, parts)


def score_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool):
    """A reward model on pairs: as `pairs_forward`, on the score head's scores (rm.py; loss bt)."""
    return pairs_forward(model, reference, spec, batch, kwargs, device, bf16, score=sequence_scores)


def unpaired_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool):
    """(prompt, completion, label) rows followed by their KL rows (KTO)."""
    first, second, first_n, _, ref_first, ref_second, _ = _halves(model, reference, spec, batch, device, bf16)
    out = spec.fn(first, ref_first, labels=batch["labels"], policy_kl_logps=second,
                  reference_kl_logps=ref_second, **kwargs)
    return _finish(out, {"rewards": out.rewards, "labels": batch["labels"], "policy": first, "lengths": first_n,
                         "logratio": first - ref_first})


def demonstrations_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool):
    """Demonstrations (sft.py): one row per example, no reference, no pairs."""
    with autocast(device, bf16):
        logps, counts = completion_logps(model, batch)
    out = spec.fn(logps, counts, **kwargs)
    parts = {"losses": out.losses, "policy": logps, "lengths": counts, **out.metrics}
    return out.losses, {k: v.detach() for k, v in parts.items()}


def rollout_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool):
    """GRPO-style rows (online/grpo.py): per-token log-probs of the sampled completions, the
    sampling policy's (`old_logps`; absent with one pass per sample: the current ones, detached),
    the reference's when the KL term is on, and one advantage per completion."""
    with autocast(device, bf16):
        token_logps, mask = completion_token_logps(model, batch)
    old = batch["old_logps"] if "old_logps" in batch else token_logps.detach()
    ref = None
    if spec.needs_reference and kwargs.get("kl_coef", 0) and not isinstance(reference, SameAsPolicy):
        with torch.no_grad(), reference.context(), autocast(device, bf16):
            ref = completion_token_logps(reference.forward_model(model), batch)[0]
    sampler, mismatch = None, {}
    if "sampler_logps" in batch and batch["sampler_logps"].numel() == int(mask.sum()):  # same tokens, row after row
        sampler = torch.zeros_like(token_logps)
        sampler[mask.bool()] = batch["sampler_logps"].to(token_logps.device, token_logps.dtype)
        diff = (old.detach() - sampler).abs() * mask
        mismatch = {"sampler_diff_sum": diff.sum(dim=1), "sampler_diff_max": diff.max(dim=1).values}
    if sampler is not None and kwargs.get("tis_cap"):
        kwargs = {**kwargs, "sampler_logps": sampler}
    keep = batch.get("completion_keep")  # DAPO's overlong filter: a truncated completion's tokens leave the loss
    loss_mask = mask if keep is None else mask * keep.to(mask.device, mask.dtype).unsqueeze(1)
    out = spec.fn(token_logps, old, ref, batch["advantages"], loss_mask, **kwargs)
    parts = {"losses": out.losses, "rewards": batch["rewards"], "advantages": batch["advantages"],
             "group_std": batch["group_std"], "policy": token_logps.sum(dim=1), "lengths": mask.sum(dim=1),
             **mismatch, **out.metrics}
    if keep is not None:
        parts["completions/truncated"] = 1.0 - keep.to(mask.device, torch.float32)
    if "staleness" in batch:  # an engine (runs/online/prefetch.py): steps between sampling and these weights
        parts["sampler/staleness_mean"] = batch["staleness"].to(mask.device, torch.float32)
    return out.losses, {k: v.detach() for k, v in parts.items()}


def spread(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values stored flat, completion after completion (as a batch of samples is kept),
    back on a batch's (N, K) `mask`; zero elsewhere."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=mask.device)
    out[mask.bool()] = flat.to(mask.device)
    return out


def completion_values(critic, batch: dict) -> torch.Tensor:
    """The critic's value of the state before each completion token, (N, K) on the positions of
    `completion_token_logps` (padded rows): the value at position t judges the action token t + 1."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    first = int(completion_mask.float().argmax(dim=1).min().clamp(min=1))
    values = critic(input_ids=input_ids, attention_mask=batch["attention_mask"])
    mask = completion_mask[:, first:].bool()
    return values[:, first - 1: input_ids.size(1) - 1] * mask


def policy_gradient_forward(model, reference, spec: LossSpec, batch: dict, kwargs: dict, device: str, bf16: bool):
    """PPO / RLOO / REINFORCE++ rows (online/ppo.py): a mini-batch of a batch of samples whose
    per-token advantages, returns, sampling-time log-probs and values were computed when it was
    sampled (flat, completion after completion); the policy's log-probs now and, with a critic
    (`kwargs["critic"]`, from the source), its values now."""
    kwargs = dict(kwargs)
    critic = kwargs.pop("critic", None)
    with autocast(device, bf16):
        token_logps, mask = completion_token_logps(model, batch)
    flat = {k: spread(batch[k], mask) for k in ("old_logps", "advantages", "returns", "old_values", "sampler_logps")
            if k in batch}
    values = None
    if critic is not None and "old_values" in flat:
        with autocast(device, bf16):
            values = completion_values(critic, batch)
        kwargs.update(values=values, old_values=flat["old_values"], returns=flat["returns"])
    if kwargs.get("tis_cap") and "sampler_logps" in flat:
        kwargs["sampler_logps"] = flat["sampler_logps"]
    out = spec.fn(token_logps, flat["old_logps"], flat["advantages"], mask, **kwargs)
    parts = {"losses": out.losses, "rewards": batch["rewards"], "policy": token_logps.sum(dim=1),
             "lengths": mask.sum(dim=1), **{k: batch[k] for k in ("kl_seq", "non_score", "returns_mean",
                                                                  "advantages_mean", "kl_coef", "explained_variance",
                                                                  "no_eos") if k in batch},
             **out.metrics}
    if "sampler_logps" in flat:
        diff = (flat["old_logps"] - flat["sampler_logps"]).abs() * mask
        parts.update(sampler_diff_sum=diff.sum(dim=1), sampler_diff_max=diff.max(dim=1).values)
    if "staleness" in batch:  # as in rollout_forward
        parts["sampler/staleness_mean"] = batch["staleness"].to(mask.device, torch.float32)
    return out.losses, {k: v.detach() for k, v in parts.items()}
