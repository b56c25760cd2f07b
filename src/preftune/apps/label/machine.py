"""`preftune score`, `preftune data sft-pairs` and a judge's labels for `preftune data agree --judge`.

score: adds reward columns to any prompt/completion file (`score`) or preference file
(`score_chosen`, `score_rejected`), keeping every other column; for filtering and analysis.
sft-pairs: from (prompt, human response) data, the human response is chosen and a fresh policy
sample is rejected (the self-play recipe); with a reward source, only pairs where it scores the
human response higher are kept. Both write their output whole or not at all.
judge_labels: a pairwise judge's "a" | "b" | "tie" per labelled pair, asked in both orders
("position_inconsistent" or "failed" where the two orders disagree or a call failed).
"""

from __future__ import annotations

import math

from ...data.sources import read_table, text_field, write_jsonl
from ...models.generate import sample_texts
from ...models.loading import load_model, load_tokenizer, resolve_model_dir
from ...models.rewards import build_reward
from ...utils.errors import ConfigError

__all__ = ["run_score", "run_sft_pairs", "judge_labels"]

_LABEL = {"first": "a", "second": "b", "tie": "tie"}  # verdict on (a, b) -> the original response


def run_score(path: str, reward_spec: str, out: str, *, judge: dict | None = None) -> dict:
    file, rows = read_table(path)
    first = rows[0][1] if isinstance(rows[0][1], dict) else {}
    sides = ["chosen", "rejected"] if "chosen" in first else ["completion" if "completion" in first else "response"]
    prompts = [text_field(file, line, row, "prompt", empty_ok=True) for line, row in rows]
    texts = {s: [text_field(file, line, row, s, empty_ok=True) for line, row in rows] for s in sides}  # validated before scoring
    reward = build_reward(reward_spec, judge=judge)  # judge: JudgeClient settings for a judge:URL source
    scored = {s: reward.score(prompts, texts[s]) for s in sides}
    result = []
    for k, (_, row) in enumerate(rows):
        extra = {"score": scored[sides[0]][k]} if len(sides) == 1 else {f"score_{s}": scored[s][k] for s in sides}
        result.append({**row, **extra})
    failed = sum(not math.isfinite(v[k]) for v in scored.values() for k in range(len(rows)))
    if failed and failed == len(rows) * len(sides):  # nothing to write: say why, in one line, before writing
        client = getattr(reward, "client", None)
        why = f" (last: {client.last_problem})" if getattr(client, "last_problem", "") else ""
        raise ConfigError(getattr(reward, "peer", reward.name), "reward", f"no usable score for any of {failed} "
                          f"texts{why}")
    write_jsonl(out, result)
    return {"records": len(rows), "scored_columns": [f"score_{s}" if len(sides) > 1 else "score" for s in sides],
            "failed": failed, "reward": reward.name, "out": out}


def run_sft_pairs(cfg, path: str, out: str, reward_spec: str | None = None) -> dict:
    file, rows = read_table(path)
    key = "response" if isinstance(rows[0][1], dict) and "response" in rows[0][1] else "completion"
    prompts = [text_field(file, line, row, "prompt", empty_ok=True) for line, row in rows]
    human = [text_field(file, line, row, key, empty_ok=True) for line, row in rows]
    o = cfg.online
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    _, policy = sample_texts(model, tokenizer, prompts, n=1, max_new_tokens=o.max_new_tokens, seed=cfg.train.seed,
                             temperature=o.temperature, top_p=o.top_p, top_k=o.top_k)
    scores_h = scores_p = None
    if reward_spec:
        reward = build_reward(reward_spec)
        scores_h, scores_p = reward.score(prompts, human), reward.score(prompts, policy)
    pairs, counts = [], {"identical": 0, "reward_disagrees": 0}
    for k, (p, h, s) in enumerate(zip(prompts, human, policy)):
        if h.strip() == s.strip():
            counts["identical"] += 1
            continue
        row = {"prompt": p, "chosen": h, "rejected": s}
        if scores_h is not None:
            if not scores_h[k] > scores_p[k]:  # NaN (a failed judge) also drops the pair
                counts["reward_disagrees"] += 1
                continue
            row.update(score_chosen=scores_h[k], score_rejected=scores_p[k])
        pairs.append(row)
    write_jsonl(out, pairs)
    return {"records": len(rows), "pairs": len(pairs), **counts, "out": out}


def judge_labels(items: list, judge_spec: str, *, pair_ids: set[str] | None = None) -> tuple[dict[str, str], dict]:
    """pair_id -> the judge's label of each (non-calibration) item in `pair_ids` (default: all),
    and the judge client's call statistics."""
    judge = build_reward(judge_spec)
    if not hasattr(judge, "verdict"):
        raise ConfigError(judge_spec, "--judge", "expected a judge:URL[#model] source (pairwise verdicts)")
    labels = {}
    for it in items:
        if not it.calibration and (pair_ids is None or it.pair_id in pair_ids):
            verdict, _ = judge.verdict(it.prompt, it.a, it.b)
            labels[it.pair_id] = _LABEL.get(verdict, verdict)
    return labels, dict(judge.client.stats)
