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

__all__ = ["collate_pairs", "collate_unpaired", "collate_sequences", "collate_packed", "collate_packed_pairs",
           "collate_packed_unpaired", "kl_pairs", "attach_reference"]


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


def kl_pairs(examples: list[TokenizedExample]) -> list[TokenizedPair]:
    """Each unpaired example as (prompt i, completion i, completion i+1 mod N): its own completion
    and the mismatched one KTO uses to estimate KL(policy || reference). Collated like pairs, this
    gives the unpaired row order [examples..., KL rows...]; the layout check reads the same rows."""
    n = len(examples)
    return [TokenizedPair(e.prompt_ids, e.completion_ids, examples[(i + 1) % n].completion_ids, e.source, e.line)
            for i, e in enumerate(examples)]


def _labelled(batch: dict, examples: list[TokenizedExample]) -> dict:
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def collate_unpaired(examples: list[TokenizedExample], pad_id: int) -> dict:
    """Rows 0..N-1: each example; rows N..2N-1: prompt i with completion i+1 (mod N), the
    mismatched pairs KTO uses to estimate KL(policy || reference). `labels` (N,) is bool."""
    return _labelled(collate_pairs(kl_pairs(examples), pad_id), examples)


def collate_packed(groups: list[tuple[list[int], list[tuple[int, list[int]]]]], n_seqs: int,
                   prefix_sharing: bool) -> dict:
    """Padding-free packing: every sequence of the batch in one row of length T (no pad token).

    `groups` is [(prompt_ids, [(sequence index, completion_ids), ...]), ...]. With
    `prefix_sharing` a group is one block [prompt, completion_1, completion_2, ...]: the prompt
    is processed once and each completion attends to the prompt and to itself only (the rejected
    completion never sees the chosen one); its positions continue from the prompt's end, so each
    completion sees exactly what it would see alone. Without it each (prompt, completion) is its
    own block. Blocks never attend to each other (block-diagonal mask).

    Worked example, one pair with prefix sharing (P prompt, C chosen, R rejected):
        input_ids    P0 P1 C0 C1 R0          position_ids 0 1 2 3 2
        R0 attends to P0 P1 R0; C1 to P0 P1 C0 C1.
    Returns input_ids (1, T), position_ids (1, T), `segments` (who attends to whom, without a
    (T, T) matrix: [(query start, query end, [(key start, key end), ...]), ...] in row order, each
    query attending by position to its keys; logprobs.dense_mask expands them), and for the completion
    tokens: `keep` (positions whose logits predict them), `targets`, `seq_index` (which sequence
    each belongs to); `n_seqs`.
    """
    ids, pos, keep, targets, seq_index, spans = [], [], [], [], [], []
    for prompt, completions in groups:
        blocks = [completions] if prefix_sharing else [[c] for c in completions]
        for block in blocks:
            start = len(ids)
            ids += prompt
            pos += range(len(prompt))
            owners = []  # (first index, length) of each completion in this block
            for seq, comp in block:
                first = len(ids)
                ids += comp
                pos += range(len(prompt), len(prompt) + len(comp))
                # token k of the completion is predicted at the position before it; the first
                # one by the prompt's last token
                keep += [start + len(prompt) - 1] + list(range(first, first + len(comp) - 1))
                targets += comp
                seq_index += [seq] * len(comp)
                owners.append((first, len(comp)))
            spans.append((start, len(prompt), owners))
    segments = []
    for start, plen, owners in spans:
        (first, n), rest = owners[0], owners[1:]
        segments.append((start, first + n, [(start, first + n)]))  # prompt + first completion: causal
        segments += [(f, f + m, [(start, start + plen), (f, f + m)]) for f, m in rest]
    # the first completion token's logit comes from the prompt's last position: with prefix
    # sharing that position is shared by chosen and rejected, so `keep` may repeat a position
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "segments": segments,
            "keep": torch.tensor(keep), "targets": torch.tensor(targets), "seq_index": torch.tensor(seq_index),
            "n_seqs": n_seqs}



def collate_packed_pairs(pairs: list[TokenizedPair], prefix_sharing: bool = True) -> dict:
    """Pairs packed in one row; sequence order [chosen..., rejected...] as in `collate_pairs`."""
    b = len(pairs)
    groups = [(p.prompt_ids, [(i, p.chosen_ids), (b + i, p.rejected_ids)]) for i, p in enumerate(pairs)]
    return collate_packed(groups, 2 * b, prefix_sharing)


def collate_packed_unpaired(examples: list[TokenizedExample], prefix_sharing: bool = True) -> dict:
    """Unpaired examples packed in one row, in `collate_unpaired`'s sequence order [examples...,
    KL rows...]: example i and its KL row share prompt i, so with prefix sharing the prompt is
    processed once for both. `labels` (N,) is bool."""
    return _labelled(collate_packed_pairs(kl_pairs(examples), prefix_sharing), examples)


def attach_reference(batch: dict, pairs: list[TokenizedPair], cache: dict) -> dict:
    """Add cached reference logps, [chosen..., rejected...] (2B,), looked up by the pairs' line."""
    rows = [cache[p.line] for p in pairs]
    batch["reference_logps"] = torch.tensor([r[0] for r in rows] + [r[1] for r in rows], dtype=torch.float32)
    return batch
