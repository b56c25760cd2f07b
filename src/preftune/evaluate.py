"""Held-out evaluation: preference accuracy, margins, and KL(policy || reference) on samples.

`preftune eval` evaluates a trained run (policy = run's model, reference = its base) or, with
no run, the base model itself ("before": policy == reference, so implicit-reward accuracy is
undefined and only raw log-prob accuracy is meaningful).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from .batches import exact_layout
from .checkpoint import file_digest, tokenizer_sha256
from .data import collate_pairs, render
from .data.collate import collate_sequences
from .errors import ConfigError, DataError
from .generate import decode_completions, run_models, sample_completions
from .logprobs import completion_logps
from .losses import LOSSES, build_loss
from .models import load_start, load_tokenizer, resolve_model_dir, weights_sha256
from .prepare import load_data, pair_collator, prepare_pairs
from .progress import progress
from .refcache import load_or_build, path_for, read, store
from .rewards import build_reward
from .safeio import atomic_write, read_json
from .step import SameAsPolicy, loss_forward, loss_kwargs

__all__ = ["reliability", "evaluate_pairs", "kl_estimate", "run_eval", "sample_metrics", "write_json", "wilson",
           "format_eval", "bootstrap_ci", "heldout_reward", "best_of_n_curve", "best_of_n_kl"]


def bootstrap_ci(values: list[float], *, n: int = 4000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int((1 - level) / 2 * n)], means[int((1 + level) / 2 * n) - 1]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) as the literature states it: log n - (n - 1) / n nats (used by Stiennon
    et al. 2020 and Gao et al. 2022, "Scaling laws for reward model overoptimization"). It is
    analytic, not measured; Beirami et al. 2024 ("Theoretical guarantees on the best-of-n
    alignment policy") show it is an upper bound on the true KL."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(scores: list[list[float]], ns: list[int], *, seed: int = 0) -> dict:
    """Mean reward of best-of-n for each n in `ns`, from ONE set of samples per prompt.

    `scores[k]` holds prompt k's sample scores in sampling order; best-of-n is the max over the
    first n of them (nested subsets: every n reuses the same draws, so per prompt the curve can
    only rise, and a larger n costs no extra samples). NaN scores (failed) are skipped and counted;
    a prompt with no finite score among its first n is left out of that n (`prompts` says how
    many count). Each n gets a 95% percentile bootstrap interval over prompts, the paired gain
    over the smallest n with its own interval, and the analytic KL bound `best_of_n_kl`."""
    ns = sorted(set(ns))
    if not ns or ns[0] < 1 or any(len(group) < ns[-1] for group in scores):
        raise ValueError(f"best-of-n needs 1 <= n <= the samples per prompt, got {ns}")
    curve, base = [], None
    for n in ns:
        best = [max(f) if f else math.nan for f in ([s for s in group[:n] if math.isfinite(s)] for group in scores)]
        if base is None:
            base = best
        usable = [b for b in best if math.isfinite(b)]
        gains = [b - a for a, b in zip(base, best) if math.isfinite(a) and math.isfinite(b)]
        curve.append({"n": n, "reward": sum(usable) / len(usable) if usable else math.nan,
                      "reward_ci95": list(bootstrap_ci(usable, seed=seed)) if usable else [math.nan, math.nan],
                      f"gain_vs_{ns[0]}": sum(gains) / len(gains) if gains else math.nan,
                      f"gain_vs_{ns[0]}_ci95": list(bootstrap_ci(gains, seed=seed)) if gains else [math.nan, math.nan],
                      "prompts": len(usable), "kl_bound": best_of_n_kl(n)})
    flat = [s for group in scores for s in group[: ns[-1]]]
    return {"curve": curve, "samples_per_prompt": ns[-1], "prompts": len(scores),
            "failed": sum(not math.isfinite(s) for s in flat),
            "kl": "analytic bound log(n) - (n-1)/n (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)"}


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


def _is_main() -> bool:
    from accelerate import PartialState  # see _shard

    return PartialState().is_main_process


def wilson(successes: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95% interval of a proportion (ties counted as half a success)."""
    if n == 0:
        return [math.nan, math.nan]
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


_EVAL_KEYS = ("accuracy/implicit_reward", "accuracy/logp", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "loss", "logps/chosen", "logps/rejected", "tokens/chosen")
_REFERENCE = len(_EVAL_KEYS)  # a row's reference (chosen, rejected) log-probs follow the summed columns


@torch.no_grad()
def evaluate_pairs(model, reference, spec, pairs, *, loss_kwargs: dict, batch_size: int, pad_id: int,
                   collate=None, desc: str = "eval", policy_logps: dict | None = None,
                   reference_logps: dict | None = None) -> dict:
    """Accuracy by implicit reward (margin > 0; an exact tie counts half) and by raw completion
    logp, each with a Wilson 95% interval, over held-out pairs. With `reference` a
    `step.SameAsPolicy` (a base model "before training") every margin is 0: implicit-reward
    accuracy is 0.5 by definition and flagged `undefined`, and each batch takes one forward.

    Rewards are the loss's own (beta * log-ratio for DPO-style losses, beta * average logp for
    SimPO/ORPO). An unpaired loss (KTO) has DPO's implicit reward beta * log-ratio, so its pairs
    are scored with the sigmoid spec; its "loss" is then DPO's and is not reported.
    Under several processes each scores its own share; per-pair values are gathered and summed
    with math.fsum, so the result is the same number for any process count (no pair twice).
    `policy_logps`, when given, receives each pair's summed (chosen, rejected) policy log-probs by line;
    `reference_logps` the reference's, where the loss has a reference (else it stays empty).
    """
    collate = collate or (lambda chunk: collate_pairs(chunk, pad_id))
    scorer = spec if spec.paired else LOSSES["sigmoid"]
    kwargs = {k: loss_kwargs[k] for k in scorer.params}
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
        rows += [(*v, p.line) for v, p in zip(zip(*(c.float().tolist() for c in columns)), chunk)]
    model.train(was_training)
    rows = _gather(rows[:real])
    if policy_logps is not None:
        chosen, rejected = _EVAL_KEYS.index("logps/chosen"), _EVAL_KEYS.index("logps/rejected")
        policy_logps.update({r[-1]: (r[chosen], r[rejected]) for r in rows})
    if reference_logps is not None:
        reference_logps.update({r[-1]: (r[_REFERENCE], r[_REFERENCE + 1]) for r in rows if not math.isnan(r[_REFERENCE])})
    n = len(rows)
    sums = {key: math.fsum(r[k] for r in rows) for k, key in enumerate(_EVAL_KEYS)}
    result = {"pairs": n, **{k: v / n for k, v in sums.items() if k != "tokens/chosen"}}
    # per-token perplexity of the chosen completions under the policy
    result["perplexity/chosen"] = math.exp(-sums["logps/chosen"] / max(sums["tokens/chosen"], 1))
    result["accuracy/implicit_reward_ci95"] = wilson(sums["accuracy/implicit_reward"], n)
    result["accuracy/logp_ci95"] = wilson(sums["accuracy/logp"], n)
    if isinstance(reference, SameAsPolicy):
        result["accuracy/implicit_reward_undefined"] = True  # policy == reference: every margin is 0
    if not spec.paired:
        del result["loss"]
    if spec.reward_model:  # scores, not log-probs: accuracy/logp is the score accuracy, no perplexity
        del result["perplexity/chosen"]
    if spec.paired:
        result["calibration"] = reliability([r[2] for r in rows])
    return result


def reliability(margins: list[float], bins: int = 10) -> dict:
    """How well sigmoid(margin) predicts that chosen beats rejected (Bradley-Terry: a reward
    model's margin r_c - r_r; DPO: the implicit-reward margin). Pairs are binned by the predicted
    probability of the side the model prefers (in [0.5, 1]); each bin holds its mean prediction,
    the fraction of those pairs where the model's preferred side is the labelled chosen one, and
    its count. ECE = count-weighted mean |prediction - accuracy|. Ties (margin 0) sit at 0.5."""
    edges = [0.5 + 0.5 * k / bins for k in range(bins + 1)]
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for m in margins:
        p = 1 / (1 + math.exp(-abs(m))) if abs(m) < 700 else 1.0
        k = min(int((p - 0.5) * 2 * bins), bins - 1)
        sums[k][0] += p
        sums[k][1] += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
        sums[k][2] += 1
    n = max(len(margins), 1)
    table = [{"lo": edges[k], "hi": edges[k + 1], "confidence": s[0] / s[2], "accuracy": s[1] / s[2], "pairs": s[2]}
             for k, s in enumerate(sums) if s[2]]
    return {"bins": table, "ece": math.fsum(b["pairs"] * abs(b["confidence"] - b["accuracy"]) for b in table) / n}


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
    and per-prompt means."""
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
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
    if hasattr(reward, "compare"):  # a pairwise judge: ask it directly, in both orders
        verdicts = [reward.compare(p, a, b) for p, a, b in zip(p_text, pol_text, ref_text)]
        done = [v for v in verdicts if math.isfinite(v)]
        out.update({"win_rate/judge": sum(done) / max(len(done), 1), "win_rate/judge_comparisons": len(done),
                    "win_rate/judge_failed": len(verdicts) - len(done)})
    out.update({"reward/source": reward.name, "reward/policy": sum(a for a, _ in pairs) / max(len(pairs), 1),
                "reward/reference": sum(b for _, b in pairs) / max(len(pairs), 1),
                "win_rate": wins / max(len(pairs), 1), "win_rate/comparisons": len(pairs),
                "reward/failed": len(ps) - len(pairs),
                "per_prompt": [{"prompt": p_text[i * n],
                                "policy": sum(ps[i * n:(i + 1) * n]) / n, "reference": sum(rs[i * n:(i + 1) * n]) / n}
                               for i in range(len(prompts))]})
    return out


def kl_prompt_count(setting: int, available: int) -> int:
    """eval.kl_prompts, or for -1 half the held-out prompts, 4 to 16. Measured on the README
    quickstart (8 held-out pairs, default model, 2 CPU cores): 16 prompts' sampling was 18.5 s of a
    27.7 s eval; 4 is about a quarter of that, and a real held-out set of 32+ prompts keeps 16."""
    return setting if setting >= 0 else min(16, max(4, available // 2))


def run_eval(cfg, *, run_dir: str | None, data_path: str | list[str], reward: str | None = None) -> dict:
    """Evaluate the run's policy (or the base model when `run_dir` is None) on one held-out
    file, or on several (then the result maps each path to its own result)."""
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    m, spec = cfg.model, build_loss(cfg.loss.name, cfg.loss.mix)
    if spec.reward_model:
        raise ConfigError(str(run_dir), "loss.name", "this is a reward model (train-rm): its held-out accuracy is in "
                          "summary.json; score files with it through rm:RUN (preftune score, eval --reward)")
    all_records = [load_data(p, cfg.data) for p in paths]  # bad data fails here, before any weights load
    source = None
    if reward:
        source = build_reward(reward)
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code, revision=m.revision)
    base, _ = load_start(m, model_dir)  # with the run's SFT adapter merged, as training started
    ref_sha = None  # the reference's weights: the key under which its log-probs are cached
    if run_dir is None:
        policy, reference = base, SameAsPolicy()  # "before training": one forward per pair
        if cfg.eval.reuse_reference_logps:  # the weights a run started from them would record as its reference
            ref_sha = weights_sha256(base)
    else:
        policy, reference = run_models(cfg, run_dir, base)
        if spec.needs_reference:
            ref_info = read_json(Path(run_dir) / "reference.json")
            if not isinstance(ref_info, dict):
                raise DataError(Path(run_dir) / "reference.json", 1, "reference.json", "expected a JSON object")
            ref_sha = ref_info.get("weights_sha256")
    policy.eval()
    results = {}
    for path, records in zip(paths, all_records):
        pairs, stats = prepare_pairs(path, cfg, tokenizer, records)
        # packed rows with prefix sharing where they are exact on this model, as in training
        checked, layout = exact_layout(cfg, spec if spec.paired else LOSSES["sigmoid"], policy,
                                       pairs[: max(cfg.eval.batch_size, 2)], tokenizer.pad_token_id, model_dir)
        collate, note, own, values, live_reference = pair_collator(checked, tokenizer), None, None, None, None
        digest = file_digest(path) if ref_sha is not None else None
        cache = None if digest is None else path_for(reference_sha256=ref_sha, data_sha256=digest,
                                                     tokenizer_sha256=tokenizer_sha256(tokenizer), data_config=cfg.data)
        if cache is not None and run_dir is not None:
            if cfg.train.reference_cache:  # the run's own setting: read them, or compute them once and keep
                values, hit = load_or_build(cache, policy, reference, pairs, batch_size=cfg.eval.batch_size,
                                            collate=collate)
                note = "read from cache" if hit else "computed and cached"
            elif cfg.eval.reuse_reference_logps:
                values = read(cache, pairs)
                note = None if values is None else "read from cache"
                if values is None:  # computed live below, kept for the next eval on this file
                    live_reference = {}
            if values is not None:
                collate = pair_collator(checked, tokenizer, values)
        elif cache is not None:
            own = {}  # the base model's log-probs are the reference's for any run trained from it
        result = {"run": run_dir or "(base model)", "data": path, "data_stats": stats.as_dict(), "layout": layout,
                  **evaluate_pairs(policy, reference, spec, pairs, loss_kwargs=loss_kwargs(cfg, spec),
                                   batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, collate=collate,
                                   policy_logps=own, reference_logps=live_reference)}
        if own and _is_main():
            store(cache, own)
            note = "stored in the cache"
        if live_reference and _is_main():  # the reference of every run started from the same weights
            store(cache, live_reference)
            note = "computed and stored in the cache"
        if note is not None:
            result["reference_logps"] = note
        e = cfg.eval
        if e.kl_prompts and isinstance(reference, SameAsPolicy) and source is None:
            # the base model against itself: KL is 0 by definition, and sampling it cost a toy eval minutes
            result.update({"kl": 0.0, "kl_stderr": 0.0, "kl_samples": 0,
                           "kl_note": "policy == reference: 0 by definition, not sampled"})
        elif e.kl_prompts:
            unique = list({tuple(p.prompt_ids): p.prompt_ids for p in pairs}.values())
            prompts = unique[: kl_prompt_count(e.kl_prompts, len(unique))]
            result.update(sample_metrics(policy, reference, tokenizer, prompts, n=e.kl_samples,
                                         max_new_tokens=e.max_new_tokens, seed=cfg.train.seed, reward=source))
        results[path] = result
    return results[paths[0]] if len(paths) == 1 else results


def format_eval(result: dict) -> str:
    """A compact table of one evaluation (or of each file of several)."""
    if "pairs" not in result:  # several files: path -> result
        return "\n\n".join(format_eval(r) for r in result.values())

    def acc(key):
        lo, hi = result[f"{key}_ci95"]
        return f"{result[key]:.3f}  [{lo:.3f}, {hi:.3f}]"

    implicit = "undefined (policy == reference)" if result.get("accuracy/implicit_reward_undefined") \
        else acc("accuracy/implicit_reward")
    lines = [f"{result['data']}: {result['pairs']} pairs, {result['run']}",
             f"  implicit-reward accuracy   {implicit}",
             f"  log-prob accuracy          {acc('accuracy/logp')}",
             f"  margin {result['rewards/margins']:.4f}   chosen perplexity {result['perplexity/chosen']:.3f}"]
    if "kl_note" in result:
        lines.append(f"  KL(policy || reference)    0 ({result['kl_note']})")
    elif "kl" in result:
        lo, hi = result.get("kl_ci95") or (result["kl"], result["kl"])
        lines.append(f"  KL(policy || reference)    {result['kl']:.3f} nats [{lo:.3f}, {hi:.3f}] (95%, "
                     f"{result['kl_samples']} samples)")
    if "win_rate" in result:
        lines.append(f"  win rate vs reference      {result['win_rate']:.3f} ({result['reward/source']})")
    return "\n".join(lines)


def write_json(result: dict, out: str | None) -> str:
    text = json.dumps(result, indent=2)
    if out:
        atomic_write(Path(out), text + "\n")
    return text
