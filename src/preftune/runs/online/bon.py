"""Best-of-N (rejection sampling): sample N completions per prompt, keep the best under a reward.

`preftune bon PROMPTS --reward SPEC` samples `online.samples_per_prompt` completions of every
prompt from a policy (a model, or a finished run directory), scores them with any reward source
(any kind in models/rewards' REWARD_KINDS, or an ensemble) and writes one row per prompt:
{prompt, completion, score, n}, n being the samples drawn (`--keep-all` adds every candidate and
its score). `--pairs OUT` pairs the same scored candidates (data/pairs.py, `online.pairing`,
best-vs-worst by default), so bon is also the pair builder's candidate generator.

`--eval 1,2,4,8` reports the best-of-n curve from the SAME samples (core/stats.best_of_n_curve:
the best of the first n draws, a 95% bootstrap interval over prompts, the analytic KL bound).
Sampling and the bootstrap are seeded by `train.seed`, so a rerun gives the same rows. Failed
scores (NaN, e.g. a judge that gave up) are never the best: they are skipped and counted, and a
prompt whose candidates all failed gets no row (`prompts_without_score`).
"""

from __future__ import annotations

import json
import math

from ...core.stats import best_of_n_curve
from ...data import render
from ...data.sources import write_jsonl
from ...models.generate import load_policy
from ...utils.errors import ConfigError
from ...utils.safeio import write_json
from .rollouts import load_prompts, pair_scored, reward_from_config, sample_and_score

__all__ = ["best_of_n", "run_bon", "format_bon"]


def best_of_n(prompts: list, texts: list[str], scores: list[float], n: int, *,
              keep_all: bool = False) -> tuple[list[dict], dict]:
    """One row per prompt from its `n` candidates (prompt-major `texts`, `scores`): the highest
    finite score (the first of equals). Returns (rows, counts: failed, prompts_without_score)."""
    rows, counts = [], {"failed": 0, "prompts_without_score": 0}
    for k, prompt in enumerate(prompts):
        group, values = texts[k * n: (k + 1) * n], scores[k * n: (k + 1) * n]
        finite = [i for i, s in enumerate(values) if math.isfinite(s)]
        counts["failed"] += n - len(finite)
        if not finite:
            counts["prompts_without_score"] += 1
            continue
        best = max(finite, key=values.__getitem__)
        row = {"prompt": prompt, "completion": render.completion_for(prompt, group[best]), "score": values[best],
               "n": n}
        if keep_all:  # NaN is not JSON: a failed candidate's score is null
            row["candidates"] = [{"completion": render.completion_for(prompt, c), "score": s if math.isfinite(s) else None}
                                 for c, s in zip(group, values)]
        rows.append(row)
    return rows, counts


def run_bon(cfg, prompts_path: str, *, policy: str | None = None, out: str | None = None,
            pairs_out: str | None = None, keep_all: bool = False, eval_ns: list[int] | None = None,
            eval_out: str | None = None) -> dict:
    """Sample, score, keep the best (to `out`), pair (to `pairs_out`), and with `eval_ns` the
    best-of-n curve (to `eval_out` as JSON too). `policy` defaults to `model.name_or_path`."""
    o = cfg.online
    n = o.samples_per_prompt
    if eval_ns and max(eval_ns) > n:
        raise ConfigError("command line", "--eval", f"n up to {max(eval_ns)} needs that many samples per prompt "
                          f"(online.samples_per_prompt is {n})")
    if o.judge_mode == "pairwise":
        raise ConfigError("config", "online.judge_mode", "best-of-n ranks samples by score; use judge_mode=score")
    prompts = load_prompts(prompts_path)  # bad prompts and reward specs fail before any weights load
    reward = reward_from_config(o)
    model, tokenizer = load_policy(policy or cfg.model.name_or_path,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights)
    texts, scores = sample_and_score(model, tokenizer, prompts, reward, o, n=n, seed=cfg.train.seed)
    rows, counts = best_of_n(prompts, texts, scores, n, keep_all=keep_all)
    result = {"prompts": len(prompts), "samples_per_prompt": n, "samples": len(texts), "reward": reward.name,
              "seed": cfg.train.seed, **counts,
              "mean_best_score": sum(r["score"] for r in rows) / len(rows) if rows else math.nan}
    if out:
        result["out"] = str(write_jsonl(out, rows))
    if pairs_out:
        pairs, pair_counts = pair_scored(prompts, texts, scores, n, o)
        result.update(pairs_out=str(write_jsonl(pairs_out, pairs)),
                      **{f"pairs/{k}": v for k, v in pair_counts.items()})
    if eval_ns:
        result["eval"] = best_of_n_curve([scores[k * n: (k + 1) * n] for k in range(len(prompts))], eval_ns,
                                         seed=cfg.train.seed)
        if eval_out:
            write_json(result, eval_out)
    stats = getattr(getattr(reward, "client", None), "stats", None)
    return {**result, **({"judge": dict(stats)} if stats else {})}


def format_bon(result: dict) -> str:
    """The counts as one JSON line, then the best-of-n curve (when evaluated) as a table."""
    curve = result.get("eval")
    lines = [json.dumps({k: v for k, v in result.items() if k != "eval"})]
    if curve:
        lines.append(f"best-of-n on {curve['prompts']} prompts ({result['reward']}, {curve['failed']} failed scores):")
        for row in curve["curve"]:
            lo, hi = row["reward_ci95"]
            lines.append(f"  n={row['n']:<3d} reward {row['reward']:.4f} [{lo:.4f}, {hi:.4f}]  "
                         f"KL <= {row['kl_bound']:.3f} nats")
    return "\n".join(lines)
