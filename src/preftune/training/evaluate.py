"""Evaluation inside a run and of any (policy, reference): preference accuracy, margins, calibration
inputs, KL(policy || reference) on samples, held-out reward. The `eval` command is apps/eval.py;
the intervals are core/stats.py.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from ..core.logprobs import completion_logps
from ..core.losses import LOSSES
from ..core.stats import bootstrap_ci, rate_by_prompt, reliability, wilson, win_rate
from ..core.step import SameAsPolicy, loss_forward
from ..data import collate_pairs, render
from ..data.collate import collate_sequences
from ..models.generate import decode_completions, sample_completions
from ..utils.progress import progress

__all__ = ["evaluate_pairs", "pair_key", "kl_estimate", "sample_metrics", "heldout_reward", "kl_prompt_count", "is_main"]


def _shard(n: int) -> tuple[list[int], int]:
    """This process's contiguous share of n items, padded with item 0 to the same length on every
    process (so each runs the same number of forwards: DDP/FSDP collectives line up), and how
    many of them are real."""
    from accelerate import PartialState  # accelerate loads only when evaluation runs

    state = PartialState()
    per = math.ceil(n / state.num_processes)
    idx = list(range(state.process_index * per, min((state.process_index + 1) * per, n)))
    return idx + [0] * (per - len(idx)), len(idx)


def _gather(rows: list) -> list:
    from accelerate import PartialState  # see _shard
    from accelerate.utils import gather_object  # see _shard

    return gather_object(rows) if PartialState().num_processes > 1 else rows


def is_main() -> bool:
    from accelerate import PartialState  # see _shard

    return PartialState().is_main_process


_EVAL_KEYS = ("accuracy/implicit_reward", "accuracy/logp", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "loss", "logps/chosen", "logps/rejected", "tokens/chosen")
_REFERENCE = len(_EVAL_KEYS)  # a row's reference (chosen, rejected) log-probs follow the summed columns


def pair_key(pair) -> str:
    """A pair's identity for matching the same pair across two evaluations: sha256 of its token
    ids (prompt, chosen, rejected), 16 hex digits. Another file, tokenizer or truncation gives
    another key, so a "before" of other pairs is never compared with this "after"."""
    ids = json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids], separators=(",", ":"))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def _outcome(margin: float) -> float:
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0  # an exact tie counts half, as the accuracies do


def _per_pair(rows: list, pairs, undefined: bool) -> list[dict]:
    """Each pair's outcomes (1 right, 0 wrong, 0.5 tie) and margins, in the file's order: the
    implicit reward's (None where policy == reference: undefined, not a tie), the policy's raw
    log-probs', and the reference's raw log-probs' (its "before", where the loss has one)."""
    chosen, rejected = _EVAL_KEYS.index("logps/chosen"), _EVAL_KEYS.index("logps/rejected")
    out = []
    for r in sorted(rows, key=lambda r: r[-2]):
        ref = r[_REFERENCE] - r[_REFERENCE + 1]
        has_ref = not (undefined or math.isnan(ref))
        out.append({"line": r[-1], "pair": pair_key(pairs[r[-2]]),
                    "implicit_correct": None if undefined else r[0], "implicit_margin": None if undefined else r[2],
                    "logp_correct": r[1], "logp_margin": r[chosen] - r[rejected],
                    "reference_logp_correct": _outcome(ref) if has_ref else None,
                    "reference_logp_margin": ref if has_ref else None})
    return out


@torch.no_grad()
def evaluate_pairs(model, reference, spec, pairs, *, loss_kwargs: dict, batch_size: int, pad_id: int,
                   collate=None, desc: str = "eval", policy_logps: dict | None = None,
                   reference_logps: dict | None = None, per_pair: list | None = None) -> dict:
    """Accuracy by implicit reward (margin > 0; an exact tie counts half) and by raw completion
    logp, each with a Wilson 95% interval, over held-out pairs. With `reference` a
    `step.SameAsPolicy` (a base model "before training") every margin is 0: implicit-reward
    accuracy is 0.5 by definition and flagged `undefined`, and each batch takes one forward.

    Rewards are the loss's own (beta * log-ratio for DPO-style losses, beta * average logp for
    SimPO/ORPO). A loss of a kind that does not train on pairs (KTO, SFT, GRPO) has its pairs scored
    by its kind's `pair_scorer` (DPO's implicit reward beta * log-ratio); its "loss" is then that
    loss's and is not reported.
    Under several processes each scores its own share; per-pair values are gathered and summed
    with math.fsum, so the result is the same number for any process count (no pair twice).
    `policy_logps`, when given, receives each pair's summed (chosen, rejected) policy log-probs by line;
    `reference_logps` the reference's, where the loss has a reference (else it stays empty).
    `per_pair`, when given, receives each pair's outcomes and margins (`_per_pair`): the input of
    paired before/after statistics (apps/eval.py, core/stats.paired_gain).
    """
    collate = collate or (lambda chunk: collate_pairs(chunk, pad_id))
    scorer = LOSSES[spec.kind.pair_scorer] if spec.kind.pair_scorer else spec
    # a loop state (bco_pair's baseline) is read, not updated: the model is in eval mode here
    kwargs = {k: loss_kwargs[k] for k in (*scorer.params, "loss_state") if k in loss_kwargs}
    idx, real = _shard(len(pairs))
    mine = [pairs[i] for i in idx]
    was_training = model.training
    model.eval()
    rows = []
    starts = range(0, len(mine), batch_size)
    for i in progress(starts, total=len(mine), desc=desc, unit="pairs",
                      weights=[min(batch_size, len(mine) - s) for s in starts]):
        losses, parts = loss_forward(model, reference, scorer, collate(mine[i: i + batch_size]), kwargs)
        margins = parts["chosen_rewards"] - parts["rejected_rewards"]
        diff = parts["policy_chosen"] - parts["policy_rejected"]
        columns = ((margins > 0) + 0.5 * (margins == 0), (diff > 0) + 0.5 * (diff == 0), margins, parts["chosen_rewards"],
                   parts["rejected_rewards"], losses, parts["policy_chosen"], parts["policy_rejected"],
                   parts["chosen_lengths"])
        # after the summed columns (_REFERENCE on) and before the line: the reference's log-probs (NaN without one)
        nan = torch.full_like(parts["policy_chosen"], math.nan)
        columns += (parts.get("reference_chosen", nan), parts.get("reference_rejected", nan))
        chunk = mine[i: i + batch_size]
        # then the pair's index in `pairs` (for its key) and its line
        rows += [(*v, j, p.line) for v, j, p in zip(zip(*(c.float().tolist() for c in columns)), idx[i: i + batch_size],
                                                    chunk)]
    model.train(was_training)
    rows = _gather(rows[:real])
    if policy_logps is not None:
        chosen, rejected = _EVAL_KEYS.index("logps/chosen"), _EVAL_KEYS.index("logps/rejected")
        policy_logps.update({r[-1]: (r[chosen], r[rejected]) for r in rows})
    if reference_logps is not None:
        reference_logps.update({r[-1]: (r[_REFERENCE], r[_REFERENCE + 1]) for r in rows if not math.isnan(r[_REFERENCE])})
    if per_pair is not None:
        per_pair.extend(_per_pair(rows, pairs, isinstance(reference, SameAsPolicy)))
    n = len(rows)
    sums = {key: math.fsum(r[k] for r in rows) for k, key in enumerate(_EVAL_KEYS)}
    result = {"pairs": n, **{k: v / n for k, v in sums.items() if k != "tokens/chosen"}}
    # per-token perplexity of the chosen completions under the policy
    result["perplexity/chosen"] = math.exp(-sums["logps/chosen"] / max(sums["tokens/chosen"], 1))
    result["accuracy/implicit_reward_ci95"] = wilson(sums["accuracy/implicit_reward"], n)
    result["accuracy/logp_ci95"] = wilson(sums["accuracy/logp"], n)
    if isinstance(reference, SameAsPolicy):
        result["accuracy/implicit_reward_undefined"] = True  # policy == reference: every margin is 0
    if spec.kind.pair_scorer:
        del result["loss"]
    if spec.kind.margins == "scores":  # scores, not log-probs: accuracy/logp is the score accuracy, no perplexity
        del result["perplexity/chosen"]
    if not spec.kind.pair_scorer:
        result["calibration"] = reliability([r[2] for r in rows])
    return result


@torch.no_grad()
def kl_estimate(model, reference, samples, *, pad_id: int, batch_size: int = 16) -> dict:
    """Monte-Carlo KL(policy || reference): mean over policy samples of sum_t log pi/pi_ref
    (unbiased, so a single estimate can come out slightly negative near zero)."""
    if isinstance(reference, SameAsPolicy):
        return {"kl": 0.0, "kl_stderr": 0.0, "kl_samples": sum(1 for s in samples if s[1])}
    was_training = model.training
    model.eval()  # no dropout: deterministic, and no draws from the training RNG
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
    model.train(was_training)
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    n = d.numel()
    mean, se = (d.mean().item() if n else 0.0), ((d.std().item() / math.sqrt(n)) if n > 1 else 0.0)
    # the estimator is unbiased, so near 0 it can come out negative: the interval says how far to trust it
    return {"kl": mean, "kl_stderr": se, "kl_ci95": [mean - 1.96 * se, mean + 1.96 * se], "kl_samples": n}


def heldout_reward(policy, reference, tokenizer, prompts: list, prompt_ids: list[list[int]], reward, *, n: int,
                   max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> dict:
    """Policy against reference on held-out prompts: each samples `n` completions per prompt with
    the same seed; their mean rewards (for a 0/1 verifier: accuracy), the gain with a 95% bootstrap
    interval over prompts (per-prompt mean policy - reference), KL(policy || reference) on the
    policy's samples and mean sample lengths. `prompts` are the prompts as given (text or
    messages, for the reward), `prompt_ids` their rendered tokens (for sampling)."""
    common = dict(n=n, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k)
    policy_samples = sample_completions(policy, tokenizer, prompt_ids, **common)
    with reference.context():
        reference_samples = sample_completions(reference.forward_model(policy), tokenizer, prompt_ids, **common)
    plain = [render.plain_text(p) for p in prompts for _ in range(n)]
    per_prompt = {}
    for name, samples in (("policy", policy_samples), ("reference", reference_samples)):
        s = reward.score(plain, decode_completions(tokenizer, samples))
        per_prompt[name] = [sum(s[k * n:(k + 1) * n]) / n for k in range(len(prompt_ids))]
    usable = [(a, b) for a, b in zip(per_prompt["policy"], per_prompt["reference"]) if math.isfinite(a) and math.isfinite(b)]
    gains = [a - b for a, b in usable]
    lo, hi = bootstrap_ci(gains) if gains else (math.nan, math.nan)

    def mean(xs):
        return sum(xs) / len(xs) if xs else math.nan

    return {"prompts": len(usable), "samples_per_prompt": n, "temperature": temperature,
            "reward/source": reward.name, "reward/policy": mean([a for a, _ in usable]),
            "reward/reference": mean([b for _, b in usable]), "reward/gain": mean(gains), "reward/gain_ci95": [lo, hi],
            "sample_length/policy": mean([len(c) for _, c in policy_samples]),
            "sample_length/reference": mean([len(c) for _, c in reference_samples]),
            **kl_estimate(policy, reference, policy_samples, pad_id=tokenizer.pad_token_id)}


def _length_stats(samples, prefix: str) -> dict:
    lengths = sorted(len(c) for _, c in samples)
    if not lengths:
        return {}
    return {f"{prefix}/mean": sum(lengths) / len(lengths), f"{prefix}/median": lengths[len(lengths) // 2],
            f"{prefix}/p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]}


def _texts(tokenizer, samples) -> tuple[list[str], list[str]]:
    return [tokenizer.decode(p) for p, _ in samples], decode_completions(tokenizer, samples)


def sample_metrics(policy, reference, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                   seed: int, reward=None) -> dict:
    """Fresh samples from policy and reference on the same prompts (same seed): KL on the
    policy's samples, length statistics of both, and with a reward source their mean scores, the
    policy's win rate (policy sample k vs reference sample k of each prompt; ties count half)
    with a bootstrap interval over prompts (core/stats.win_rate), and per-prompt means."""
    pad = tokenizer.pad_token_id
    pol = sample_completions(policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed)
    if isinstance(reference, SameAsPolicy):
        ref = pol  # the same model and seed: the same samples
    else:
        with reference.context():
            ref = sample_completions(reference.forward_model(policy), tokenizer, prompts, n=n,
                                     max_new_tokens=max_new_tokens, seed=seed)
    out = {**kl_estimate(policy, reference, pol, pad_id=pad), **_length_stats(pol, "sample_length/policy"),
           **_length_stats(ref, "sample_length/reference")}
    if reward is None:
        return out
    p_text, pol_text = _texts(tokenizer, pol)
    _, ref_text = _texts(tokenizer, ref)
    ps, rs = reward.score(p_text, pol_text), reward.score(p_text, ref_text)
    pairs = [(a, b) for a, b in zip(ps, rs) if math.isfinite(a) and math.isfinite(b)]
    won = win_rate(ps, rs, n)  # interval over prompts: a prompt's n samples are not independent
    if hasattr(reward, "compare"):  # a pairwise judge: ask it directly, in both orders
        verdicts = [reward.compare(p, a, b) for p, a, b in zip(p_text, pol_text, ref_text)]
        judged = rate_by_prompt(verdicts, n)  # a failed verdict (NaN) is left out and counted
        out.update({"win_rate/judge": 0.0 if not judged["comparisons"] else judged["rate"],
                    "win_rate/judge_ci95": judged["ci95"], "win_rate/judge_comparisons": judged["comparisons"],
                    "win_rate/judge_failed": judged["failed"]})
    out.update({"reward/source": reward.name, "reward/policy": sum(a for a, _ in pairs) / max(len(pairs), 1),
                "reward/reference": sum(b for _, b in pairs) / max(len(pairs), 1),
                "win_rate": won["win_rate"] if won["comparisons"] else 0.0, "win_rate/ci95": won["ci95"],
                "win_rate/comparisons": won["comparisons"], "reward/failed": won["failed"],
                "per_prompt": [{"prompt": p_text[i * n], "policy": sum(ps[i * n:(i + 1) * n]) / n,
                                "reference": sum(rs[i * n:(i + 1) * n]) / n,
                                "win": won["by_prompt"][i] if math.isfinite(won["by_prompt"][i]) else None}
                               for i in range(len(prompts))]})
    return out


def kl_prompt_count(setting: int, available: int) -> int:
    """eval.kl_prompts, or for -1 half the held-out prompts, 4 to 16. Measured on the README
    quickstart (8 held-out pairs, default model, 2 CPU cores): 16 prompts' sampling was 18.5 s of a
    27.7 s eval; 4 is about a quarter of that, and a real held-out set of 32+ prompts keeps 16."""
    return setting if setting >= 0 else min(16, max(4, available // 2))


