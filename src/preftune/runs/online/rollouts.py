"""Prompts in, scored pairs out: what iterative rounds, online micro-batches and `synth` share.

`load_prompts` reads a prompt file; `reward_from_config` builds the `online.*` reward source;
`generate_and_pair` samples `online.samples_per_prompt` completions per prompt through the one
rendering, scores them and pairs them (data/pairs.py), every dropped candidate counted.
`sample_and_score` is its first half (best-of-N, online/bon.py, uses it alone).

With `online.judge_mode=pairwise` (a `judge:` reward) nothing is scored alone: every two distinct
samples of a prompt go to the judge in both slot orders (n(n-1) calls per prompt) and pairs come
from the verdicts that survive the swap; position-inconsistent ones are counted and dropped
(data/pairs.py `pairs_from_verdicts`).
"""

from __future__ import annotations

import itertools
import math

from ...data import render
from ...data.pairs import build_pairs, pairs_from_verdicts
from ...data.sources import messages, read_table, split_path, text_field
from ...models.generate import sample_texts
from ...models.rewards import build_reward
from ...utils.errors import ConfigError, DataError
from ...utils.safeio import read_capped

__all__ = ["load_prompts", "generate_and_pair", "sample_and_score", "pair_scored", "judge_pairs", "reward_from_config", "judge_settings"]


def load_prompts(path: str) -> list:
    """A .txt file (one prompt per non-empty line) or any data file with a `prompt` column of
    strings or chat-message lists."""
    file, part = split_path(path)
    if file.suffix == ".txt":  # bounded, regular files only (a FIFO or a device is one line)
        try:
            text = read_capped(file).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(str(file), 1, "encoding", f"not UTF-8 (byte {err.start})") from None
        prompts = [line for line in text.splitlines() if line.strip()][part]
    else:  # read_table applies the `file[:N]` slice
        prompts = []
        for line, row in read_table(path, what="prompts")[1]:
            if isinstance(row.get("prompt"), list):  # chat messages: rendered with the model's template
                prompts.append(messages(row, "prompt", (str(file), line)))
            else:
                prompts.append(text_field(file, line, row, "prompt"))
    if not prompts:
        raise DataError(str(file), 1, "file", "no prompts")
    return prompts


def sample_and_score(model, tokenizer, prompts: list, reward, o, *, n: int, seed: int,
                     engine=None) -> tuple[list[str], list[float]]:
    """`n` completions per prompt (prompt-major, sampled with `o`'s settings, by `engine` when one is
    given) and their scores (NaN where the source failed)."""
    _, texts = sample_texts(model, tokenizer, prompts, n=n, max_new_tokens=o.max_new_tokens, seed=seed,
                            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, engine=engine)
    return texts, reward.score([render.plain_text(p) for p in prompts for _ in range(n)], texts)


def generate_and_pair(model, tokenizer, prompts: list[str], reward, o, *, seed: int,
                      engine=None) -> tuple[list[dict], dict]:
    """Sample `o.samples_per_prompt` completions per prompt, score them, pair them (counts summed)."""
    n = o.samples_per_prompt
    if o.judge_mode == "pairwise":
        _, texts = sample_texts(model, tokenizer, prompts, n=n, max_new_tokens=o.max_new_tokens, seed=seed,
                                temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, engine=engine)
        return judge_pairs(prompts, texts, n, reward, mode=o.pairing)
    texts, scores = sample_and_score(model, tokenizer, prompts, reward, o, n=n, seed=seed, engine=engine)
    pairs, totals = pair_scored(prompts, texts, scores, n, o, getattr(reward, "last_rationales", None) or None)
    finite = [s for s in scores if math.isfinite(s)]
    totals.update(samples=len(texts), reward_mean=sum(finite) / len(finite) if finite else math.nan)
    return pairs, totals


def pair_scored(prompts: list, texts: list[str], scores: list[float], n: int, o,
                rationales: list | None = None) -> tuple[list[dict], dict]:
    """Pairs of each prompt's `n` scored samples (`o.pairing`, `o.min_margin`), counts summed."""
    pairs, totals = [], {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0}
    for k, prompt in enumerate(prompts):
        sl = slice(k * n, (k + 1) * n)
        got, counts = build_pairs(prompt, texts[sl], scores[sl], mode=o.pairing, min_margin=o.min_margin,
                                  rationales=rationales[sl] if rationales else None)
        pairs += _conversational(prompt, got)
        totals = {key: totals[key] + counts[key] for key in totals}
    return pairs, totals


def judge_pairs(prompts: list, texts: list[str], n: int, judge, *, mode: str) -> tuple[list[dict], dict]:
    """Pairs from a pairwise judge's verdicts on every two of each prompt's `n` samples, both
    orders each. Identical texts are ties without a call. Counts are per comparison and summed:
    pairs, ties, failed, position_inconsistent (asked, and the winner moved with the slot)."""
    pairs, totals = [], {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0, "position_inconsistent": 0}
    for k, prompt in enumerate(prompts):
        group, plain = texts[k * n: (k + 1) * n], render.plain_text(prompt)
        verdicts, rationales = {}, {}
        for i, j in itertools.combinations(range(n), 2):
            if group[i] == group[j]:
                verdicts[i, j] = "tie"
            else:
                verdicts[i, j], rationales[i, j] = judge.verdict(plain, group[i], group[j])
        got, counts = pairs_from_verdicts(prompt, group, verdicts, mode=mode, rationales=rationales)
        pairs += _conversational(prompt, got)
        totals = {key: totals[key] + counts[key] for key in totals}
    totals.update(samples=len(texts), comparisons=len(prompts) * n * (n - 1) // 2, reward_mean=math.nan)
    return pairs, totals


def _conversational(prompt, rows: list[dict]) -> list[dict]:
    """A conversational prompt makes a conversational pair (assistant turns)."""
    for row in rows:
        row["chosen"], row["rejected"] = (render.completion_for(prompt, row[k]) for k in ("chosen", "rejected"))
    return rows


def judge_settings(o) -> dict:
    """JudgeClient settings from `online.judge_*`, for any reward that may be a judge:URL."""
    return {"timeout_s": o.judge_timeout_s, "retries": o.judge_retries, "backoff_s": o.judge_backoff_s}


def reward_from_config(o):
    """The reward source `online.*` names (an ensemble when `online.reward_ensemble` is set)."""
    spec = ({"ensemble": o.reward_ensemble, "disagreement_penalty": o.disagreement_penalty}
            if o.reward_ensemble else o.reward)
    reward = build_reward(spec, length_penalty=o.length_penalty, judge=judge_settings(o))
    if o.judge_mode == "pairwise" and not hasattr(reward, "verdict"):
        raise ConfigError(reward.name, "online.judge_mode", "pairwise needs one judge:URL reward (no ensemble, "
                          "no length penalty): verdicts compare two samples and have no score to combine")
    return reward
