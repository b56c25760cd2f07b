"""Decode-step attention for the sampler: a prompt's keys and values stored once, not once per sample.

After the prefill, `DynamicCache` would hold every prompt's K/V copied to each of its n rows, and
grow by `torch.cat` at every step: at n=8 and 512-token prompts that re-reads and re-writes the
whole cache (~1.8 GB for SmolLM2-135M) per generated token. `SharedPrefixKV` keeps instead

* the prompts' K/V from the prefill, one copy per prompt: (kv heads, prompts, width, head dim),
  keys stored transposed;
* one suffix buffer per row for the tokens it generates, written in place (capacity doubles when
  full, so rows that stop early do not reserve `max_new_tokens` slots).

A decode step's attention (registered as NAME in transformers' AttentionInterface, active only
inside `decoding(model)`) computes, per layer and kv head,

    prefix scores   the queries of all rows of a prompt against that prompt's K, one matmul per
                    prompt: rows are laid out as a (prompts, rows per prompt) grid and the query
                    heads sharing a kv head ride along as extra query rows (grouped-query
                    attention without repeating K/V)
    suffix scores   each row's queries against its own generated tokens

then one softmax over [prefix, suffix] (exact, not a merge of two partial softmaxes), pads of a
left-padded prompt at -inf after scaling and soft-capping, and the weighted sum of the two parts.

`unsupported(model, cache, context)` says why a batch must keep the DynamicCache path instead:
a model type whose attention call this route was not checked against, a sliding window that
would cut into the context, a cache layer that is not a plain dynamic one, or a model whose
attention implementation cannot be switched. Nothing here knows about sampling; sampler.py decides.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["NAME", "MODEL_TYPES", "SharedPrefixKV", "decoding", "unsupported"]

NAME = "preftune_shared_prefix"
# decoder types whose attention layer was checked to call the attention function with
# (module, query, key, value, mask, scaling=, dropout=, [sliding_window=, softcap=]) after rotary
# and q/k norms, K/V heads in repeat_kv order: tests/models/test_shared_prefix.py compares logits
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2",
                         "gpt_neox"})
_FIRST_CAPACITY = 64  # suffix slots allocated at first; doubled when full
_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface  # deferred: ~1 s to import, loaded with any model anyway

        # no mask function is registered under NAME on purpose: transformers then builds no 4D mask
        # for decode steps (this route takes pads from SharedPrefixKV and needs no causal mask)
        AttentionInterface.register(NAME, _attention)
        _registered = True


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, shared_prefix=None, **kwargs):
    if shared_prefix is None:
        raise RuntimeError(f"attention '{NAME}' serves the sampler's decode steps only (no shared_prefix given)")
    return shared_prefix.attend(module.layer_idx, query, key, value, scaling=scaling, softcap=softcap,
                                window=sliding_window), None


def unsupported(model, cache, context: int) -> str | None:
    """Why this batch cannot decode through SharedPrefixKV exactly; None when it can. `cache` is
    the DynamicCache after the prefill, `context` the longest context a decode step attends over
    (padded prompt width + new tokens)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # deferred: see _register

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model type {model_type!r} is not one this route was checked on"
    if not hasattr(model, "set_attn_implementation"):
        return "the model cannot switch its attention implementation"
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.sliding_window < context:
                return f"layer {i} has a sliding window of {layer.sliding_window} < context {context}"
        elif type(layer) is not DynamicLayer:
            return f"layer {i} caches through {type(layer).__name__}"
    window = getattr(config, "sliding_window", None)  # models that window every layer by config
    if isinstance(window, int) and window < context:
        return f"sliding window {window} < context {context}"
    return None


@contextmanager
def decoding(model):
    """Within: `model`'s attention is NAME (pass `shared_prefix=` to every forward); restored after."""
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        if model.config._attn_implementation != NAME:
            raise RuntimeError(f"{type(model).__name__} did not switch its attention to {NAME}")
        yield
    finally:
        model.set_attn_implementation(before)


class SharedPrefixKV:
    """Per-layer K/V of one planned batch: prompts' prefill K/V once each, rows' new tokens in place.

    `row_slot[r]` is the prompt (index into the prefill batch) of row r; `mask` (prompts, width) is
    the prefill's attention mask (0 on left pads). Call `attend` through the model (each layer
    writes its new key/value at the current length), then `advance()` once per decode step, and
    `keep(rows)` when rows leave.
    """

    def __init__(self, cache, mask: torch.Tensor, row_slot: torch.Tensor, max_new_tokens: int):
        # the prompt axis next to the query rows, so that one prompt's rows are one matrix of the
        # batched matmul: keys (kv heads, prompts, head dim, width), stored transposed (a third
        # faster than a transposed view on CPU), values (kv heads, prompts, width, head dim). Kept
        # in fp32 (or wider) for a bf16 model too: scores rounded to bf16 would move a weight by up
        # to ~1% per unit of score, where SDPA keeps them in fp32
        dtype = torch.promote_types(cache.layers[0].keys.dtype, torch.float32)
        self.prefix_kt = [layer.keys.permute(1, 0, 3, 2).to(dtype).contiguous() for layer in cache.layers]
        self.prefix_v = [layer.values.transpose(0, 1).to(dtype).contiguous() for layer in cache.layers]
        self.pad = ~mask.bool()                                                # (prompts, width)
        self.max_new_tokens = max_new_tokens
        self.length = 0                                                        # suffix tokens written
        capacity = min(max_new_tokens, _FIRST_CAPACITY)
        rows = row_slot.numel()
        # (kv heads, rows, capacity, head dim): a row's generated tokens, written in place
        self.suffix_k = [k.new_empty(k.size(0), rows, capacity, k.size(2)) for k in self.prefix_kt]
        self.suffix_v = [v.new_empty(v.size(0), rows, capacity, v.size(3)) for v in self.prefix_v]
        self._layout(row_slot)

    def _layout(self, row_slot: torch.Tensor) -> None:
        """The (prompts, rows per prompt) grid of the live rows: `cell[r]` is row r's place in it,
        None when the rows already are the grid in order (every prompt has the same number of
        rows, prompt-major: the sampler's usual layout), which makes the grid a view."""
        prompts, slot = row_slot.unique(return_inverse=True)  # prompts with live rows only
        if prompts.numel() < self.prefix_kt[0].size(1):        # a prompt's last row left: drop its K/V
            self.prefix_kt = [k.index_select(1, prompts) for k in self.prefix_kt]
            self.prefix_v = [v.index_select(1, prompts) for v in self.prefix_v]
            self.pad = self.pad.index_select(0, prompts)
        counts = torch.bincount(slot, minlength=prompts.numel())
        self.per_prompt = int(counts.max())
        order = slot.argsort(stable=True)
        rank = torch.empty_like(slot)
        rank[order] = torch.arange(slot.numel(), device=slot.device) - (counts.cumsum(0) - counts)[slot[order]]
        cell = slot * self.per_prompt + rank
        dense = cell.numel() == prompts.numel() * self.per_prompt and \
            bool((cell == torch.arange(cell.numel(), device=cell.device)).all())
        self.slot, self.cell = slot, None if dense else cell
        bias = torch.zeros(self.pad.shape, dtype=torch.float32, device=self.pad.device)
        self.row_bias = bias.masked_fill(self.pad, float("-inf"))[slot][None, :, None, :]  # (1, rows, 1, width)

    def _moved(self, rows: torch.Tensor | None = None, capacity: int | None = None) -> None:
        """Fresh suffix buffers holding the written tokens: of `rows` only, and/or with `capacity` slots."""
        n = self.length

        def moved(s):
            fresh = s.new_empty(s.size(0), s.size(1) if rows is None else rows.numel(), capacity or s.size(2),
                                s.size(-1))
            fresh[:, :, :n] = s[:, :, :n] if rows is None else s[:, :, :n].index_select(1, rows)
            return fresh
        self.suffix_k = [moved(s) for s in self.suffix_k]
        self.suffix_v = [moved(s) for s in self.suffix_v]

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` (indices into the current rows, ascending) go on; the others left the batch."""
        self._moved(rows=rows)
        self._layout(self.slot[rows])

    def advance(self) -> None:
        """Every layer has written this step's key and value: the next step writes one slot further."""
        self.length += 1
        capacity = self.suffix_k[0].size(2)
        if self.length == capacity < self.max_new_tokens:
            self._moved(capacity=min(2 * capacity, self.max_new_tokens))

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(kv heads, rows, g, X) -> (kv heads, prompts, rows per prompt * g, X)."""
        heads, _, g, width = x.shape
        if self.cell is not None:
            grid = x.new_zeros(heads, self.prefix_kt[0].size(1) * self.per_prompt, g, width)
            x = grid.index_copy_(1, self.cell, x)
        return x.reshape(heads, -1, self.per_prompt * g, width)

    def _from_grid(self, y: torch.Tensor, g: int) -> torch.Tensor:
        """(kv heads, prompts, rows per prompt * g, X) -> (kv heads, rows, g, X)."""
        y = y.reshape(y.size(0), -1, g, y.size(-1))
        return y if self.cell is None else y.index_select(1, self.cell)

    def attend(self, layer: int, query, key, value, *, scaling, softcap=None, window=None) -> torch.Tensor:
        """query (rows, q heads, 1, D), key/value (rows, kv heads, 1, D) of this step, after rotary.
        Returns (rows, 1, q heads, D) in the query's dtype, what the attention layer projects.
        `softcap` (Gemma 2) caps scores as softcap * tanh(score / softcap) before the pads' -inf;
        `window` is only checked: a window shorter than the context is refused, not applied."""
        if torch.is_autocast_enabled(query.device.type):  # the fp32 scores stay fp32 under autocast
            with torch.autocast(query.device.type, enabled=False):
                return self._attend(layer, query, key, value, scaling=scaling, softcap=softcap, window=window)
        return self._attend(layer, query, key, value, scaling=scaling, softcap=softcap, window=window)

    def _attend(self, layer, query, key, value, *, scaling, softcap, window) -> torch.Tensor:
        rows, q_heads, steps, dim = query.shape
        kv_heads = key.size(1)
        g = q_heads // kv_heads
        n = self.length + 1                                   # suffix tokens including this one
        if steps != 1 or window is not None and window < self.pad.size(1) + self.max_new_tokens:
            raise RuntimeError("SharedPrefixKV serves one-token decode steps without a binding window")
        sk, sv = self.suffix_k[layer], self.suffix_v[layer]
        sk[:, :, self.length] = key[:, :, 0].transpose(0, 1)
        sv[:, :, self.length] = value[:, :, 0].transpose(0, 1)
        scale = dim ** -0.5 if scaling is None else scaling
        # head h = kv head h // g (repeat_kv's order): (kv heads, rows, g, D)
        q = (query.reshape(rows, kv_heads, g, dim).transpose(0, 1).to(sk.dtype) * scale).contiguous()
        prefix = self._from_grid(self._to_grid(q) @ self.prefix_kt[layer], g)  # (kv, rows, g, W)
        suffix = q @ sk[:, :, :n].transpose(-1, -2)                                         # (kv, rows, g, n)
        scores = torch.cat([prefix, suffix], dim=-1)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        width = prefix.size(-1)
        scores[..., :width] += self.row_bias                  # left pads of the prompt get no weight
        weights = scores.softmax(dim=-1)
        out = self._from_grid(self._to_grid(weights[..., :width]) @ self.prefix_v[layer], g)
        out = out + weights[..., width:] @ sv[:, :, :n]       # (kv heads, rows, g, D)
        return out.permute(1, 0, 2, 3).reshape(rows, 1, q_heads, out.size(-1)).to(query.dtype)
