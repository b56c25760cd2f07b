"""Batched sampling with a KV cache, length buckets and per-sample random streams.

`generate.sample_completions` hands each batch to HF `model.generate`: every prompt is re-run for
each of its n samples, every row is left-padded to the widest prompt of its batch and a finished
row keeps computing pad tokens until the last one ends. Here instead:

* each prompt is prefilled once, so a prompt costs one forward over its tokens, not n. Its K/V
  then stay stored once: decode steps attend to them through `shared_prefix.SharedPrefixKV`, one
  batched matmul for all rows of a prompt and each row's new tokens written in place into its own
  buffer (exact attention, one softmax over both). Where that route is not known to be exact
  (`shared_prefix.unsupported`: model types it was not checked on, a sliding window shorter than
  the context), the prompt's DynamicCache is copied to its n rows (`batch_select_indices` with a
  repeated index) and grows by concatenation, as before. Memory of the shared route: the
  prompts' K/V once, plus rows x (tokens generated so far, capacity doubling) x K/V per token,
  kept in fp32 for a bf16 model; the copied cache holds rows x (width + tokens) in the model's
  dtype;
* prompts are sorted by length and packed into batches of at most `max_rows` rows, so padding is
  bounded by the length spread inside a batch (left padding, with the attention mask and explicit
  position ids, so a padded row computes what it would compute alone);
* a row that emits EOS leaves the batch and the cache at once;
* every sample draws from its own generator, seeded from (seed, prompt index, sample index), one
  uniform per token, turned into a token by inverse CDF over the filtered distribution in
  vocabulary order. A sample therefore does not depend on `max_rows`, on the bucketing or on the
  other prompts of the call, up to floating-point differences between batch shapes: a token can
  only change where its uniform lies within rounding error (~1e-7 in fp32) of a CDF boundary.

`SamplingCopy` keeps a merged copy of a LoRA policy for sampling: one matmul per linear layer
instead of the base matmul plus two adapter matmuls.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..utils.devices import model_device, place
from . import shared_prefix

__all__ = ["Sample", "sample", "filtered_probs", "draw_tokens", "row_seed", "SamplingCopy"]


@dataclass
class Sample:
    """One continuation of `prompt`. `logps[t]` is the log-prob of `completion[t]` under the
    distribution it was drawn from (temperature, top-k and top-p applied; 0.0 for greedy, a point
    mass); `model_logps[t]` under the raw model (temperature 1, unfiltered), which is what the
    trainer computes for the same tokens."""
    prompt: list[int]
    completion: list[int]  # cut after the first EOS, EOS kept
    logps: list[float]
    model_logps: list[float]


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample's generator: a hash, so neighbouring keys give unrelated streams."""
    key = struct.pack("<qqq", seed, prompt_index, sample_index)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def filtered_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from, (R, V) float32 in vocabulary order.

    Order: divide by `temperature`; keep the `top_k` highest logits (ties with the k-th kept too);
    softmax; keep the smallest set of most likely tokens whose mass reaches `top_p` (a token is
    kept when the mass strictly above it is below `top_p`, so the top token always stays);
    renormalize. top_k=0 and top_p=1 leave the softmax untouched.
    """
    scaled = logits.float() / temperature                                 # (R, V)
    if 0 < top_k < scaled.size(-1):
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]                 # (R, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        above = sorted_probs.cumsum(dim=-1) - sorted_probs                # mass of more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, above >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: for each row, the first token whose cumulative probability exceeds u * total.

    probs (R, V) >= 0, normalized or not (the total is the row's sum); u (R,) in [0, 1). The CDF is
    summed in float64 so that a 50k-token tail keeps its mass; a zero-probability token is never
    chosen (its CDF step is empty).
    """
    return _inverse_cdf(probs, u)[0]


_BLOCK = 256  # tokens per block of the two-level CDF


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draw_tokens and each row's total mass (R, 1) float64. Two levels, both in float64: the block
    of 256 tokens whose cumulative mass first exceeds u * total, then the token inside it, so only
    one block per row is scanned (a float64 cumsum over (R, V) is a sequential pass that cost ~30 ms a
    step at 64 x 49152 on one core, plus its 25 MB buffer). Sums differ from a flat cumsum's by
    float64 rounding only."""
    rows, vocab = probs.shape
    full = vocab // _BLOCK * _BLOCK
    sums = probs[:, :full].reshape(rows, full // _BLOCK, _BLOCK).sum(dim=-1, dtype=torch.float64)
    if full < vocab:                                                      # the last, shorter block
        sums = torch.cat([sums, probs[:, full:].sum(dim=-1, dtype=torch.float64, keepdim=True)], dim=1)
    before = sums.cumsum(dim=-1)                                          # (R, blocks): mass up to each block's end
    total = before[:, -1:].contiguous()                                   # (R, 1)
    x = u.double().unsqueeze(1) * total
    # u * total can round up to total: fall back to where the CDF reaches its total, the last
    # block (and inside it the last token) with mass; a search, not a pass over the vocabulary
    block = torch.minimum(torch.searchsorted(before, x, right=True), torch.searchsorted(before, total))
    index = block * _BLOCK + torch.arange(_BLOCK, device=probs.device)    # (R, _BLOCK)
    inside = probs.gather(1, index.clamp(max=vocab - 1)).double().masked_fill(index >= vocab, 0.0)
    start = torch.where(block > 0, before.gather(1, (block - 1).clamp(min=0)), 0.0)
    cdf = inside.cumsum(dim=-1) + start                                   # (R, _BLOCK)
    offset = torch.minimum(torch.searchsorted(cdf, x, right=True), torch.searchsorted(cdf, cdf[:, -1:].contiguous()))
    return (block * _BLOCK + offset).squeeze(1), total


_PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0)


def _plan(lengths: list[int], n: int, max_rows: int) -> list[list[tuple[int, int, int]]]:
    """Batches of (prompt index, first sample index, count), at most `max_rows` rows each, prompts
    shortest first so that each batch pads to a width close to its own prompts'. A prompt with
    more than `max_rows` samples is split (and prefilled once per batch it spans)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current, rows = [], [], 0
    for i in order:
        for first in range(0, n, max_rows):
            count = min(max_rows, n - first)
            if rows + count > max_rows:
                batches.append(current)
                current, rows = [], 0
            current.append((i, first, count))
            rows += count
    return batches + [current] if current else batches


def _uniforms(seed: int, chunks, steps: int) -> torch.Tensor:
    """(rows, steps) float64: row r's uniforms come from its own generator, so they are the same
    whichever batch the row lands in."""
    out = []
    for i, first, count in chunks:
        for j in range(first, first + count):
            gen = torch.Generator().manual_seed(row_seed(seed, i, j))
            out.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(out)


def _step(model, ids, mask, positions, cache) -> torch.Tensor:
    """One forward that extends `cache`; the logits of each row's last position, (R, V)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


class _CopiedCache:
    """Decode steps on the prefill's DynamicCache with each prompt's K/V copied to its rows: the
    route for models and settings that shared_prefix.py does not handle exactly."""

    def __init__(self, model, cache, mask, row_slot):
        cache.batch_select_indices(row_slot)                              # copy each prompt's cache to its rows
        self.model, self.cache, self.mask = model, cache, mask[row_slot]
        self.context = nullcontext()

    def keep(self, rows) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]

    def step(self, token, positions) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), 1)], dim=1)
        return _step(self.model, token[:, None], self.mask, positions[:, None], self.cache)


class _SharedPrefix:
    """Decode steps on SharedPrefixKV: each prompt's K/V once, rows' new tokens written in place."""

    def __init__(self, model, cache, mask, row_slot, max_new_tokens):
        self.model, self.kv = model, shared_prefix.SharedPrefixKV(cache, mask, row_slot, max_new_tokens)
        self.context = shared_prefix.decoding(model)

    def keep(self, rows) -> None:
        self.kv.keep(rows)

    def step(self, token, positions) -> torch.Tensor:
        out = self.model(input_ids=token[:, None], position_ids=positions[:, None], use_cache=False,
                         logits_to_keep=1, shared_prefix=self.kv)
        self.kv.advance()
        return out.logits[:, -1]


def _decoder(model, cache, mask, row_slot, max_new_tokens):
    if shared_prefix.unsupported(model, cache, mask.size(1) + max_new_tokens) is None:
        return _SharedPrefix(model, cache, mask, row_slot, max_new_tokens)
    return _CopiedCache(model, cache, mask, row_slot)


def _run_batch(model, prompts, chunks, *, seed, max_new_tokens, eos_id, pad_id, greedy, filters) -> list:
    """Sample the rows of one planned batch; returns ((prompt index, sample index), Sample) pairs."""
    from transformers import DynamicCache  # deferred: ~1 s to import

    slots = list(dict.fromkeys(i for i, _, _ in chunks))                 # each prompt once
    width = max(len(prompts[i]) for i in slots)
    ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in slots])
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in slots])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)                     # pads do not shift positions
    row_slot = torch.tensor([slots.index(i) for i, _, count in chunks for _ in range(count)])
    keys = [(i, j) for i, first, count in chunks for j in range(first, first + count)]
    ids, mask, positions, row_slot = place((ids, mask, positions, row_slot), model)
    u = None if greedy else place(_uniforms(seed, chunks, max_new_tokens), model)  # (R, steps)

    cache = DynamicCache(config=model.config)
    logits = _step(model, ids, mask, positions, cache)[row_slot]          # (R, V): each prompt prefilled once
    decoder = _decoder(model, cache, mask, row_slot, max_new_tokens)
    del cache  # the decoder holds what it needs (the shared route: its own copy of the K/V)
    next_pos = positions[row_slot, -1] + 1
    live = torch.arange(len(keys), device=mask.device)                    # original row of each live row
    tokens, logps, model_logps = ([[] for _ in keys] for _ in range(3))
    with decoder.context:
        for step in range(max_new_tokens):
            token, logp, model_logp = _draw(logits, None if greedy else u[live, step], filters)
            done = (token == eos_id) | (step == max_new_tokens - 1)
            # one device->host copy per step: the tokens and log-probs of the live rows
            for r, t, lp, mlp in zip(live.tolist(), token.tolist(), logp.tolist(), model_logp.tolist()):
                tokens[r].append(t)
                logps[r].append(lp)
                model_logps[r].append(mlp)
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            if keep.numel() < live.numel():  # finished rows leave the batch and the cache
                decoder.keep(keep)
                live, token, next_pos = live[keep], token[keep], next_pos[keep]
            logits = decoder.step(token, next_pos)
            next_pos = next_pos + 1
    return [(key, Sample(prompts[key[0]], tokens[r], logps[r], model_logps[r])) for r, key in enumerate(keys)]


def _draw(logits, u, filters):
    """This step's tokens (R,), their log-probs under the sampling distribution and under the raw
    model; `u` (R,) the rows' uniforms, None for greedy. `logits` (R, V) is this step's scratch:
    fp32 logits are overwritten in place (exp(logit - max)), so that a step allocates no (R, V)
    buffer beyond the model's own output (fresh buffers that large are page-faulted in at every
    step on CPU)."""
    logits = logits.float()
    plain = u is not None and filters == _PLAIN  # the model's own distribution
    if u is None:
        token = logits.argmax(dim=-1)
        logp = torch.zeros_like(token, dtype=torch.float32)
    elif not plain:
        probs = filtered_probs(logits, **filters)
        token = draw_tokens(probs, u)
        logp = probs.gather(1, token[:, None]).squeeze(1).log()
    top = logits.amax(dim=-1, keepdim=True)                               # (R, 1)
    if not plain:
        picked = logits.gather(1, token[:, None]) - top
    mass = logits.sub_(top).exp_()                                        # (R, V) unnormalized probabilities
    if plain:
        token, total = _inverse_cdf(mass, u)
        picked = mass.gather(1, token[:, None]).log()                     # > 0: a token drawn has mass
    else:
        total = mass.sum(dim=-1, keepdim=True, dtype=torch.float64)
    model_logp = (picked.double() - total.log()).float().squeeze(1)      # log-softmax at the token
    return token, model_logp if plain else logp, model_logp


def _check(prompts, n, max_new_tokens, temperature, top_p, top_k, greedy, max_rows) -> None:
    if n < 1 or max_rows < 1 or max_new_tokens < 0:
        raise ValueError(f"need n >= 1, max_rows >= 1, max_new_tokens >= 0 (got {n}, {max_rows}, {max_new_tokens})")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first completion token is predicted from it)")


def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, seed: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
           max_rows: int = 64, dtype: torch.dtype | None = None, progress=None) -> list[Sample]:
    """`n` samples of each prompt, prompt-major (n of prompts[0], then n of prompts[1], ...).

    Defaults are pure sampling (temperature 1, no top-k/top-p): KL estimates from samples need the
    model's own distribution. `greedy` takes the argmax (as HF `do_sample=False`). A completion
    stops after its first `eos_id` (kept) or at `max_new_tokens`; eos_id=-1 never stops early.
    `dtype` (e.g. torch.bfloat16) runs the forwards under autocast in that dtype; None keeps the
    model's own dtype. For the speed of bf16 weights, sample from `SamplingCopy(policy,
    dtype=torch.bfloat16).model` instead. The model runs in eval mode (restored afterwards) under
    no_grad; the caller's global RNG is never drawn from. `progress(batches, rows)` may wrap the
    planned batches (rows: the samples in each) to report them as they finish.
    """
    _check(prompts, n, max_new_tokens, temperature, top_p, top_k, greedy, max_rows)
    out: list = [None] * (len(prompts) * n)
    if max_new_tokens == 0:
        return [Sample(list(p), [], [], []) for p in prompts for _ in range(n)]
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    device = model_device(model)
    model_dtype = next(model.parameters()).dtype
    cast = torch.autocast(device.type, dtype=dtype) if dtype not in (None, model_dtype) else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), cast:
            batches = _plan([len(p) for p in prompts], n, max_rows)
            if progress is not None:
                batches = progress(batches, [sum(count for _, _, count in chunks) for chunks in batches])
            for chunks in batches:
                for (i, j), s in _run_batch(model, prompts, chunks, seed=seed, max_new_tokens=max_new_tokens,
                                            eos_id=eos_id, pad_id=pad_id, greedy=greedy, filters=filters):
                    out[i * n + j] = s
    finally:
        model.train(was_training)
    return out


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel  # deferred: only LoRA runs need peft
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class SamplingCopy:
    """The weights to sample from: for a PEFT LoRA policy, a separate model whose linear layers
    hold W + scaling * B @ A (one matmul each, no adapter matmuls, no PEFT dispatch), kept in step
    by `refresh(policy)` after each optimizer step. For any other model, the model itself.

    Memory: one extra copy of the base weights in the sampling dtype (`dtype`, default the
    policy's: +540 MB for SmolLM2-135M in fp32, +270 MB in bf16), plus a transient copy of the
    policy while it is built. The policy is never merged in place: merging and unmerging W on the
    policy rounds it each time, and with adapters-off references the frozen reference would drift.

    Supported: plain LoRA adapters (any number, active ones summed) on modules whose weight is
    not shared; DoRA and other variants, modules_to_save and trainable non-LoRA weights are
    refused, since `refresh` would not follow them.
    """

    def __init__(self, policy, *, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._names: list[str] = []
        if not _is_peft(policy):
            self.model = policy  # nothing to merge: sample from the model (sample(dtype=) for autocast)
            return
        from peft.tuners.lora import LoraLayer  # deferred: see _is_peft

        for name, p in policy.named_parameters():
            if p.requires_grad and "lora_" not in name:
                raise ValueError(f"SamplingCopy follows LoRA weights only; {name} is trainable too")
        inner = policy.get_base_model()
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                if getattr(module, "lora_variant", None):
                    raise ValueError(f"SamplingCopy merges plain LoRA only; {name} uses a variant (e.g. DoRA)")
                self._names.append(name)
        merged = copy.deepcopy(policy).unload()  # the base structure and weights, adapters removed
        self.model = merged.to(dtype) if dtype is not None else merged
        self.model.eval().requires_grad_(False)
        shared = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            shared.setdefault(p.data_ptr(), []).append(name)
        for name in self._names:
            if len(shared[self.model.get_submodule(name).weight.data_ptr()]) > 1:
                raise ValueError(f"SamplingCopy cannot merge LoRA into {name}: its weight is tied to another module")
        self.refresh(policy)

    @torch.no_grad()
    def refresh(self, policy) -> SamplingCopy:
        """Recompute each adapted layer's merged weight from the policy's current base weight and
        adapters (W + sum over active adapters of scaling * B @ A) into the copy. Costs one pass
        over the adapted weights; nothing is reloaded and the policy is only read."""
        if self.model is policy:
            return self
        modules = dict(policy.get_base_model().named_modules())
        for name in self._names:
            lora = modules[name]
            base = lora.get_base_layer()
            weight, bias = base.weight, base.bias
            if not lora.disable_adapters:
                for adapter in lora.active_adapters:
                    if adapter not in lora.lora_A or adapter in lora.merged_adapters:
                        continue  # not on this layer, or already inside W
                    weight = weight + lora.get_delta_weight(adapter).to(weight.dtype)
                    if lora.lora_bias.get(adapter) and bias is not None:
                        bias = bias + lora.lora_B[adapter].bias * lora.scaling[adapter]
            target = self.model.get_submodule(name)
            target.weight.copy_(weight)  # copy_ casts to the sampling dtype
            if bias is not None:
                target.bias.copy_(bias)
        return self
