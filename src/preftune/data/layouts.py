"""Which batch layout gives exact log-probs on a given model (layer 2: models + logprobs).

The packed layout puts a micro-batch in one row with a block-diagonal additive mask and
position ids that restart per pair (prefix sharing: rejected continues the prompt's positions
and never attends to chosen). That is exact only when the model's attention honours a custom
4D mask and explicit position ids. Some cannot: GPT-2-style absolute position embeddings are
fine, but attention implementations that build their own masks (sliding windows rebuilt from
positions, flash-attention varlen paths) or soft-capping kernels may ignore or alter ours.

`check_layouts` measures instead of guessing: it forwards a few pairs (the first batch) in each
layout and alone, fp32, and returns the largest |delta logp|. `choose_layout` measures once per
run the layout asked for and falls back, saying so in one line, from packed+sharing to packed
without sharing to padded, the first that agrees with sequences forwarded alone within `tol` nats
(a later layout is measured only when the one before it failed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.attention import uses_block_attention
from ..core.logprobs import completion_logps, sliding_window
from .collate import collate_packed_pairs, collate_pairs, collate_sequences

__all__ = ["check_layouts", "choose_layout", "LAYOUT_TOL"]

LAYOUT_TOL = 1e-3  # nats per sequence, fp32 (observed agreement is ~1e-5; a broken mask is >> 1)


_COLLATE = {"packed_shared": lambda pairs, pad_id: collate_packed_pairs(pairs, prefix_sharing=True),
            "packed": lambda pairs, pad_id: collate_packed_pairs(pairs, prefix_sharing=False),
            "padded": collate_pairs}


@torch.no_grad()
def _alone(model, pairs: list, pad_id: int) -> torch.Tensor:
    """Each sequence forwarded on its own: chosen logps of every pair, then rejected."""
    alone = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            batch = collate_sequences([p.prompt_ids], [getattr(p, side)], pad_id)
            alone.append(completion_logps(model, batch)[0][0])
    return torch.stack(alone)


@torch.no_grad()
def _delta(model, pairs: list, pad_id: int, name: str, alone: torch.Tensor) -> float:
    """Max |delta logp| of layout `name` against `alone`."""
    was_training = model.training
    model.eval()
    try:
        logps = completion_logps(model, _COLLATE[name](pairs, pad_id))[0]
    finally:
        model.train(was_training)
    return float((logps - alone).abs().max())


def check_layouts(model, pairs: list, pad_id: int) -> dict:
    """Max |delta logp| of each layout against every sequence forwarded alone (one batch of pairs)."""
    alone = _alone(model, pairs, pad_id)
    return {name: _delta(model, pairs, pad_id, name, alone) for name in _COLLATE}


@dataclass(frozen=True)
class Layout:
    """The row layout a run uses, as the layout check chose it for the model: every collate
    function takes this, not the Config (the configured data.layout is what was asked for)."""
    layout: str            # "packed" | "padded"
    prefix_sharing: bool   # packed: the prompt once for the completions that follow it

    @classmethod
    def asked(cls, data) -> Layout:
        """What the config asks for (before any check)."""
        return cls(data.layout, data.prefix_sharing)


def choose_layout(model, pairs: list, pad_id: int, *, layout: str, prefix_sharing: bool, max_length: int,
                  name: str = "model", log=print) -> tuple[str, bool, dict]:
    """(layout, prefix_sharing) that is exact on this model, plus the measured deltas.

    Measured on `pairs`. Sliding windows are built into the packed mask (logprobs.
    packed_attention_mask); the measurement is what guards any model whose attention does
    something else with a custom mask. When the first batch fits inside the window it cannot
    show a window problem, so `max_length` beyond the window is said once as well."""
    if layout == "padded":
        return layout, prefix_sharing, {}
    # measured in fallback order and only as far as needed: the layout asked for passes on every SDPA
    # model of the test matrix, and each further layout is one more forward of the batch before step 1
    alone = _alone(model, pairs, pad_id)
    wanted = "packed_shared" if prefix_sharing else "packed"
    deltas = {wanted: _delta(model, pairs, pad_id, wanted, alone)}
    deltas["attention"] = "block" if uses_block_attention(model) else "dense_mask"  # attention.py
    window = sliding_window(getattr(model, "config", None))
    if window is not None:
        deltas["sliding_window"] = window
    if deltas[wanted] <= LAYOUT_TOL:
        return layout, prefix_sharing, deltas
    for candidate, (lay, share) in (("packed", ("packed", False)), ("padded", ("padded", False))):
        if candidate not in deltas:
            deltas[candidate] = _delta(model, pairs, pad_id, candidate, alone)
        if deltas[candidate] <= LAYOUT_TOL:
            log(f"layout: {name} does not honour the {wanted} mask/positions exactly (max |delta logp| "
                f"{deltas[wanted]:.3g} nats); using data.layout={lay} data.prefix_sharing={str(share).lower()}")
            return lay, share, deltas
    log(f"layout: no layout agrees with single-sequence forwards on {name} (deltas {deltas}); using padded")
    return "padded", False, deltas
