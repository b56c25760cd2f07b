"""Pairs -> one padded batch holding [chosen..., rejected...] so both sides share one forward.

Worked example, B = 2, pad id 0 (P = prompt token, C = chosen, R = rejected):
    pair 0: P P | C C C        pair 1: P | C
            P P | R                    P | R R
    input_ids (2B, T=5):  [P P C C C] [P C 0 0 0] [P P R 0 0] [P R R 0 0]
    completion_mask:      [0 0 1 1 1] [0 1 0 0 0] [0 0 1 0 0] [0 1 1 0 0]
    attention_mask:       [1 1 1 1 1] [1 1 0 0 0] [1 1 1 0 0] [1 1 1 0 0]
Rows 0..B-1 are chosen, rows B..2B-1 rejected (right padding).
"""

from __future__ import annotations

import torch

from .tokenize import TokenizedExample, TokenizedPair

__all__ = ["collate_pairs", "collate_unpaired", "collate_sequences"]


def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Right-pad prompt+completion rows; mark completion tokens in `completion_mask`."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p): len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict:
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_sequences(prompts, completions, pad_id)


def collate_unpaired(examples: list[TokenizedExample], pad_id: int) -> dict:
    """Rows 0..N-1: each example; rows N..2N-1: prompt i with completion i+1 (mod N), the
    mismatched pairs KTO uses to estimate KL(policy || reference). `labels` (N,) is bool."""
    n = len(examples)
    prompts = [e.prompt_ids for e in examples] * 2
    completions = [e.completion_ids for e in examples] + [examples[(i + 1) % n].completion_ids for i in range(n)]
    batch = collate_sequences(prompts, completions, pad_id)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch
