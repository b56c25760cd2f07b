"""Length-balancing preference data: the cure for the length-bias trap.

When chosen completions are longer than rejected ones in most pairs, DPO can lower its loss by
preferring length itself and the policy grows verbose (`length_drift` fires). `balance_length`
drops pairs, at random (seeded), from the larger of the two groups "chosen longer" and "chosen
shorter" until the two are equally large; pairs of equal length are kept. Lengths are token
counts under the model's tokenizer (whole completions, nothing truncated), as `data inspect`
reports them.
"""

from __future__ import annotations

import random

from .tokenize import tokenize_records

__all__ = ["balance_length"]


def balance_length(records: list, tokenizer, *, seed: int = 0) -> tuple[list, dict]:
    """(kept records in their original order, counts before and after)."""
    toks, _ = tokenize_records(records, tokenizer, max_length=10**9, max_prompt_length=10**9 - 1,
                               drop_overlong=True, allow_degenerate=True)  # full lengths, nothing cut
    by_line = {t.line: t for t in toks}
    longer, shorter, equal = [], [], []
    for i, r in enumerate(records):
        t = by_line[r.line]
        c, rej = len(t.chosen_ids), len(t.rejected_ids)
        (longer if c > rej else shorter if c < rej else equal).append(i)
    keep = min(len(longer), len(shorter))
    rng = random.Random(seed)
    kept = sorted(rng.sample(longer, keep) + rng.sample(shorter, keep) + equal)
    counts = {"pairs_in": len(records), "chosen_longer_in": len(longer), "chosen_shorter_in": len(shorter),
              "equal": len(equal), "dropped": len(records) - len(kept), "pairs_out": len(kept),
              "chosen_longer_out": keep, "chosen_shorter_out": keep}
    return [records[i] for i in kept], counts
