"""Prompts in, scored pairs out: what iterative rounds, online micro-batches and `synth` share.

`load_prompts` reads a prompt file; `reward_from_config` builds the `online.*` reward source;
`generate_and_pair` samples `online.samples_per_prompt` completions per prompt through the one
rendering, scores them and pairs them (data/pairs.py), every dropped candidate counted.
"""

from __future__ import annotations

import math

from ..data import render
from ..data.pairs import build_pairs
from ..data.sources import messages, read_table, split_path, text_field
from ..errors import DataError
from ..generate import sample_texts
from ..rewards import build_reward
from ..safeio import read_capped

__all__ = ["load_prompts", "generate_and_pair", "reward_from_config"]


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


def generate_and_pair(model, tokenizer, prompts: list[str], reward, o, *, seed: int) -> tuple[list[dict], dict]:
    """Sample `o.samples_per_prompt` completions per prompt, score them, pair them (counts summed)."""
    n = o.samples_per_prompt
    _, texts = sample_texts(model, tokenizer, prompts, n=n, max_new_tokens=o.max_new_tokens, seed=seed,
                            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k)
    scores = reward.score([render.plain_text(p) for p in prompts for _ in range(n)], texts)
    rationales = getattr(reward, "last_rationales", None) or None
    pairs, totals = [], {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0}
    for k, prompt in enumerate(prompts):
        sl = slice(k * n, (k + 1) * n)
        got, counts = build_pairs(prompt, texts[sl], scores[sl], mode=o.pairing, min_margin=o.min_margin,
                                  rationales=rationales[sl] if rationales else None)
        for row in got:  # a conversational prompt makes a conversational pair (assistant turns)
            row["chosen"], row["rejected"] = (render.completion_for(prompt, row[k]) for k in ("chosen", "rejected"))
        pairs += got
        totals = {key: totals[key] + counts[key] for key in totals}
    finite = [s for s in scores if math.isfinite(s)]
    totals.update(samples=len(texts), reward_mean=sum(finite) / len(finite) if finite else math.nan)
    return pairs, totals


def reward_from_config(o):
    """The reward source `online.*` names (an ensemble when `online.reward_ensemble` is set)."""
    spec = ({"ensemble": o.reward_ensemble, "disagreement_penalty": o.disagreement_penalty}
            if o.reward_ensemble else o.reward)
    judge = {"timeout_s": o.judge_timeout_s, "retries": o.judge_retries, "backoff_s": o.judge_backoff_s}
    return build_reward(spec, length_penalty=o.length_penalty, judge=judge)
