"""Which batch layout gives exact log-probs on a given model (layer 2: models + logprobs).

The packed layout puts a micro-batch in one row with a block-diagonal additive mask and
position ids that restart per pair (prefix sharing: rejected continues the prompt's positions
and never attends to chosen). That is exact only when the model's attention honours a custom
4D mask and explicit position ids. Some cannot: GPT-2-style absolute position embeddings are
fine, but attention implementations that build their own masks (sliding windows rebuilt from
positions, flash-attention varlen paths) or soft-capping kernels may ignore or alter ours.

`check_layouts` measures instead of guessing: it forwards a few pairs (the first batch) in each
layout and alone, fp32, and returns the largest |delta logp|. `choose_layout` runs it once per
run and falls back, saying so in one line, from packed+sharing to packed without sharing to
padded, the first that agrees with sequences forwarded alone within `tol` nats.
"""

from __future__ import annotations

import torch

from .data.collate import collate_packed_pairs, collate_pairs, collate_sequences
from .logprobs import completion_logps

__all__ = ["check_layouts", "choose_layout", "LAYOUT_TOL"]

LAYOUT_TOL = 1e-3  # nats per sequence, fp32 (observed agreement is ~1e-5; a broken mask is >> 1)


@torch.no_grad()
def check_layouts(model, pairs: list, pad_id: int) -> dict:
    """Max |delta logp| of each layout against every sequence forwarded alone (one batch of pairs)."""
    alone = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            batch = collate_sequences([p.prompt_ids], [getattr(p, side)], pad_id)
            alone.append(completion_logps(model, batch)[0][0])
    alone = torch.stack(alone)
    was_training = model.training
    model.eval()
    try:
        got = {"packed_shared": completion_logps(model, collate_packed_pairs(pairs, prefix_sharing=True))[0],
               "packed": completion_logps(model, collate_packed_pairs(pairs, prefix_sharing=False))[0],
               "padded": completion_logps(model, collate_pairs(pairs, pad_id))[0]}
    finally:
        model.train(was_training)
    return {name: float((logps - alone).abs().max()) for name, logps in got.items()}


def sliding_window(config) -> int | None:
    """The attention window of a model that has sliding-window layers, else None."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def choose_layout(model, pairs: list, pad_id: int, *, layout: str, prefix_sharing: bool, max_length: int,
                  name: str = "model", log=print) -> tuple[str, bool, dict]:
    """(layout, prefix_sharing) that is exact on this model, plus the measured deltas.

    Measured on `pairs`, and also decided from the config: with a custom 4D mask the model's own
    sliding window is not applied (measured on mistral, gemma2, gemma3: up to 0.6 nats off once a
    sequence outgrows the window), so a window shorter than `data.max_length` means padded rows
    even when the first batch happens to fit inside it."""
    if layout == "padded":
        return layout, prefix_sharing, {}
    window = sliding_window(getattr(model, "config", None))
    if window is not None and window < max_length:
        log(f"layout: {name} has sliding-window attention ({window} tokens) shorter than data.max_length "
            f"({max_length}); packed rows would ignore the window, using data.layout=padded")
        return "padded", False, {"sliding_window": window}
    deltas = check_layouts(model, pairs, pad_id)
    wanted = "packed_shared" if prefix_sharing else "packed"
    if deltas[wanted] <= LAYOUT_TOL:
        return layout, prefix_sharing, deltas
    for candidate, (lay, share) in (("packed", ("packed", False)), ("padded", ("padded", False))):
        if deltas[candidate] <= LAYOUT_TOL:
            log(f"layout: {name} does not honour the {wanted} mask/positions exactly (max |delta logp| "
                f"{deltas[wanted]:.3g} nats); using data.layout={lay} data.prefix_sharing={str(share).lower()}")
            return lay, share, deltas
    log(f"layout: no layout agrees with single-sequence forwards on {name} (deltas {deltas}); using padded")
    return "padded", False, deltas
