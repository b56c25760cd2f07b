"""Block attention for packed rows: memory that grows with the pairs, not with the row squared.

A packed row (data/collate.collate_packed) holds blocks [prompt, completion 1, completion 2, ...];
a completion attends to its prompt and to itself. Written as one dense (T, T) mask that costs
4*T^2 bytes before attention even starts (2.3 GB for a micro-batch of 8 two-thousand-token pairs)
and keeps SDPA off its fused kernels. Here the row is cut into *segments* instead:

    [prompt + first completion]   one causal SDPA call over a contiguous span (the fused kernel)
    [each later completion]       queries of that completion against keys [prompt, completion],
                                  with a small (n, prompt + n) mask from the position ids

so the largest mask is one completion by one block, and attention for the row is the
concatenation of the segments' outputs, in row order. A sliding window (Mistral, Gemma 2/3,
Qwen 2/3 sliding layers: the `sliding_window` the model passes per layer) is applied by position
inside each segment.

Mechanism: transformers' AttentionInterface. `use_block_attention(model)` switches a model whose
attention is SDPA to the registered name "preftune_block", which is SDPA itself unless the call
carries `packed_segments` (only logprobs._packed_logps passes it), so generation, padded batches
and everything else run the library's SDPA unchanged. Gradient checkpointing recomputes with the
same keyword, so it composes. Models with their own attention code (eager-only, softcapping,
custom kernels) are left alone and keep the dense mask; `layouts.choose_layout` measures both
routes against single-sequence forwards either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "use_block_attention", "uses_block_attention", "block_attention", "segment_mask"]

BLOCK = "preftune_block"
_registered = False


def segment_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(nq, nk) bool: key visible to query by position (causal), within `window` if given."""
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    return visible & (diff < window) if window else visible


def block_attention(query, key, value, segments, positions, *, scaling, window: int | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """Exact attention of a packed row by segments. query (1, H, T, D); key/value (1, H, T, D)
    (kv heads already repeated); `segments` [(q_start, q_end, [(k_start, k_end), ...]), ...] in
    row order; `positions` (T,). Returns (1, H, T, D)."""
    outs = []
    for q0, q1, ranges in segments:
        q = query[:, :, q0:q1]
        if len(ranges) == 1 and ranges[0] == (q0, q1) and not window:  # contiguous and causal: fused kernel
            outs.append(F.scaled_dot_product_attention(q, key[:, :, q0:q1], value[:, :, q0:q1], is_causal=True,
                                                       scale=scaling, dropout_p=dropout))
            continue
        k = torch.cat([key[:, :, a:b] for a, b in ranges], dim=2)
        v = torch.cat([value[:, :, a:b] for a, b in ranges], dim=2)
        k_pos = torch.cat([positions[a:b] for a, b in ranges])
        mask = segment_mask(positions[q0:q1], k_pos, window)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, dropout_p=dropout))
    return torch.cat(outs, dim=2)


def _forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, sliding_window=None,
             packed_segments=None, **kwargs):
    from transformers.integrations.sdpa_attention import (  # see use_block_attention
        repeat_kv,
        sdpa_attention_forward,
    )

    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    segments, positions = packed_segments
    out = block_attention(query, key, value, segments, positions, scaling=scaling, window=sliding_window,
                          dropout=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface  # deferred: loads with the first model anyway
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # likewise

    AttentionInterface.register(BLOCK, _forward)
    AttentionMaskInterface.register(BLOCK, sdpa_mask)  # unpacked calls build SDPA's own masks
    _registered = True


def uses_block_attention(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == BLOCK


def use_block_attention(model) -> bool:
    """Switch `model` (and its sub-models) from SDPA to block attention; False when its attention
    is anything else (left as it is)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    try:
        model.set_attn_implementation(BLOCK)
    except (ValueError, AttributeError, TypeError):  # a model class that refuses custom names
        return False
    return uses_block_attention(model)
