"""`preftune data inspect FILE`: what a preference file looks like before anyone trains on it.

Pure functions over validated records and a tokenizer: pair counts, prompt and completion
length distributions, length bias (how often chosen is longer than rejected), identical and
duplicate pairs, truncation at the configured lengths, token-boundary mismatches, and label
balance for unpaired data.
"""

from __future__ import annotations

import json
from collections import Counter

from .records import PreferenceRecord, UnpairedRecord
from .render import boundary_mismatch, has_double_bos, prompt_ids
from .tokenize import tokenize_records, tokenize_unpaired

__all__ = ["inspect_records", "format_inspection"]


def _dist(values: list[int]) -> dict:
    v = sorted(values)
    if not v:
        return {}
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    return {"mean": round(sum(v) / len(v), 1), "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1]}


def _key(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True)


def _boundary_mismatch(tokenizer, prompt, completion) -> bool:
    """Tokenizing prompt+completion as one piece gives other ids than tokenizing them apart
    (a merge across the boundary, e.g. a prompt ending in a space): the training spans, made
    apart, are then not what the model sees when it reads the text whole (data/render.py)."""
    eos = tokenizer.eos_token_id
    return boundary_mismatch(tokenizer, prompt, completion, eos) if eos is not None else False


def _rendering_problems(tokenizer, records: list) -> dict:
    """Signs that a file was built with another rendering: prompts whose ids start with two BOS
    (a pre-rendered template or a BOS typed into the text, on a tokenizer that adds one too) and
    string fields that already contain the tokenizer's special tokens (template markup)."""
    specials = [t for t in tokenizer.all_special_tokens if t and t != tokenizer.pad_token]
    double = sum(has_double_bos(tokenizer, prompt_ids(tokenizer, r.prompt)) for r in records)
    fields = ("prompt", "chosen", "rejected", "completion")
    marked = sum(any(isinstance(getattr(r, f, None), str) and any(t in getattr(r, f) for t in specials)
                     for f in fields) for r in records)
    return {"double_bos": double, "special_tokens_in_text": marked}


def inspect_records(records: list, tokenizer, *, max_length: int, max_prompt_length: int) -> dict:
    """Statistics of validated records (pairs or unpaired examples), token lengths from `tokenizer`."""
    n = len(records)
    prompt_len = [len(prompt_ids(tokenizer, r.prompt)) for r in records]
    prompts = Counter(_key(r.prompt) for r in records)
    out = {"records": n, "distinct_prompts": len(prompts), "prompt_tokens": _dist(prompt_len),
           **_rendering_problems(tokenizer, records)}
    if records and isinstance(records[0], UnpairedRecord):
        good = sum(r.label for r in records)
        toks, stats = tokenize_unpaired(records, tokenizer, max_length=max_length,
                                        max_prompt_length=max_prompt_length)
        out.update({"kind": "unpaired", "desirable": good, "undesirable": n - good,
                    "desirable_fraction": round(good / n, 4),
                    "completion_tokens": _dist([len(t.completion_ids) for t in toks]),
                    "truncated": stats.truncated,
                    "boundary_mismatches": sum(_boundary_mismatch(tokenizer, r.prompt, r.completion)
                                               for r in records)})
        return out
    assert all(isinstance(r, PreferenceRecord) for r in records)
    toks, stats = tokenize_records(records, tokenizer, max_length=10**9, max_prompt_length=10**9 - 1,
                                   drop_overlong=True, allow_degenerate=True)  # full lengths, nothing cut
    chosen = [len(t.chosen_ids) for t in toks]
    rejected = [len(t.rejected_ids) for t in toks]
    _, cut = tokenize_records(records, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                              drop_overlong=True, allow_degenerate=True)
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    triples = Counter((_key(r.prompt), _key(r.chosen), _key(r.rejected)) for r in records)
    out.update({
        "kind": "paired",
        "chosen_tokens": _dist(chosen), "rejected_tokens": _dist(rejected),
        "length_bias": {"chosen_longer": round(longer / n, 4), "chosen_shorter": round(shorter / n, 4),
                        "equal": round((n - longer - shorter) / n, 4),
                        "mean_chosen_minus_rejected": round(sum(chosen) / n - sum(rejected) / n, 2)},
        "identical_pairs": sum(_key(r.chosen) == _key(r.rejected) for r in records),
        "duplicate_pairs": sum(c - 1 for c in triples.values() if c > 1),
        "prompts_with_several_pairs": sum(1 for c in prompts.values() if c > 1),
        "truncated": {"max_length": max_length, "max_prompt_length": max_prompt_length,
                      "pairs": cut.truncated, "dropped_degenerate_after_cut": cut.dropped},
        "boundary_mismatches": sum(_boundary_mismatch(tokenizer, r.prompt, r.chosen)
                                   or _boundary_mismatch(tokenizer, r.prompt, r.rejected) for r in records),
    })
    return out


def format_inspection(path: str, s: dict) -> str:
    """A short human summary; the JSON holds everything."""
    lines = [f"{path}: {s['records']} {s['kind']} records, {s['distinct_prompts']} distinct prompts",
             f"  prompt tokens {s['prompt_tokens']}"]
    if s.get("double_bos") or s.get("special_tokens_in_text"):
        lines.append(f"  WARNING rendering: {s['double_bos']} prompts start with two BOS tokens, "
                     f"{s['special_tokens_in_text']} records already contain special tokens (was the file "
                     "rendered with a chat template before? give messages or plain text)")
    if s["kind"] == "paired":
        b = s["length_bias"]
        lines += [f"  chosen tokens {s['chosen_tokens']}", f"  rejected tokens {s['rejected_tokens']}",
                  f"  length bias: chosen longer in {b['chosen_longer']:.1%} of pairs, shorter in "
                  f"{b['chosen_shorter']:.1%}, equal {b['equal']:.1%} (mean difference "
                  f"{b['mean_chosen_minus_rejected']:+.1f} tokens)",
                  f"  identical pairs {s['identical_pairs']}, duplicate pairs {s['duplicate_pairs']}, "
                  f"prompts with several pairs {s['prompts_with_several_pairs']}",
                  f"  truncated at max_length={s['truncated']['max_length']}: {s['truncated']['pairs']} pairs",
                  f"  token-boundary mismatches: {s['boundary_mismatches']}"]
    else:
        lines += [f"  label balance: {s['desirable']} desirable / {s['undesirable']} undesirable "
                  f"({s['desirable_fraction']:.1%} desirable)", f"  completion tokens {s['completion_tokens']}",
                  f"  truncated: {s['truncated']}, token-boundary mismatches: {s['boundary_mismatches']}"]
    return "\n".join(lines)
