"""The LM head's log-softmax over blocks of positions: log p(target) and entropy per token without
keeping a (tokens, vocabulary) tensor (issue 37). logprobs.py routes every per-token log-prob here.

Dense, M positions cost an (M, V) logits tensor and its log-softmax, both kept for backward:
~0.4 MB per token in fp32 at V = 49k (SmolLM2), ~2 MB at 262k (Gemma 3). Here the positions go
through the head `chunk` at a time. Forward keeps the head's input h (M, H), which the dense head
keeps as well, and one logsumexp per position; backward recomputes each block's logits. Extra
memory is two (chunk, V) float32 blocks, whatever M is.

For a block of rows h (c, H), head weight W (V, H) and bias b (V,):
    z = h W^T + b,  logits = post(z),  lse = logsumexp(logits),  log p(t) = logits[t] - lse,
    d log p(t) / d logits = onehot(t) - softmax(logits),  entropy = -sum(p log p), log p = logits - lse,
    log sum_v p(v)^2 = logsumexp(2 logits) - 2 lse (WPO's weight alignment, core/losses/dpo_variants.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["HeadPost", "head_post", "chunked_token_logps"]


class HeadPost(NamedTuple):
    """What a model's CausalLM forward does to the head's output before it is a logit, in this
    order: multiply (Cohere's logit_scale), divide (Granite's logits_scaling), soft-cap (Gemma 2/3:
    cap * tanh(z / cap)). The ops are the model's own, in place, so values match it bit for bit."""
    mul: float | None = None
    div: float | None = None
    cap: float | None = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """post(z), in place on a fresh float32 block; returns the block."""
        if self.mul is not None:
            z.mul_(self.mul)
        if self.div is not None:
            z.div_(self.div)
        if self.cap is not None:
            z.div_(self.cap).tanh_().mul_(self.cap)
        return z


# Architectures whose CausalLM forward is exactly `post(lm_head(hidden[:, logits_to_keep]))` with
# the post above, read in transformers 5.23's modeling files. Any other model type takes the
# dense route: a forward we have not read may do more to the logits (the dense route is exact
# whatever it does, only bigger).
_PLAIN = ("llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gpt2", "gpt_neox", "olmo2", "gemma")
_POSTS = {
    **{t: (lambda c: HeadPost()) for t in _PLAIN},
    "gemma2": lambda c: HeadPost(cap=c.final_logit_softcapping),
    "gemma3_text": lambda c: HeadPost(cap=c.final_logit_softcapping),
    "cohere": lambda c: HeadPost(mul=c.logit_scale),
    "granite": lambda c: HeadPost(div=c.logits_scaling),
}


_NO_POST = HeadPost()


def head_post(config) -> HeadPost | None:
    """The post-head transform of a model with this config, or None when its architecture is not
    one whose forward we have read (then log-probs take the dense route)."""
    post = _POSTS.get(getattr(config, "model_type", None))
    return None if post is None else post(config)


def _block_logits(h, weight, bias, post: HeadPost, dtype) -> torch.Tensor:
    """post(h W^T + b) for one block (c, H) -> (c, V) float32. The matmul runs in `dtype` (the
    dense head's precision), everything after it in float32."""
    return post.apply(F.linear(h.to(dtype), weight, bias).float())


class _ChunkedLogps(torch.autograd.Function):
    """log p(targets) (M,) and, if asked, entropies (M,) and log sum_v p(v)^2 (M,) (neither
    differentiable: an RL metric and WPO's detached weight) of the rows `hidden` (M, H) through the
    head; gradients to hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, post: HeadPost, dtype, want_entropy: bool,
                want_sq: bool):
        w = weight.to(dtype)  # a no-op unless a low-precision weight runs in fp32 (_FP32Head)
        b = None if bias is None else bias.to(dtype)
        m = hidden.size(0)
        token = hidden.new_empty(m, dtype=torch.float32)
        lse = hidden.new_empty(m, dtype=torch.float32)
        entropy = hidden.new_empty(m if want_entropy else 0, dtype=torch.float32)
        log_sum_sq = hidden.new_empty(m if want_sq else 0, dtype=torch.float32)
        for s in range(0, m, chunk):
            e = min(s + chunk, m)
            logits = _block_logits(hidden[s:e], w, b, post, dtype)                        # (c, V)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            token[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            if want_sq:  # before the entropy below rewrites the block in place
                log_sum_sq[s:e] = torch.logsumexp(2 * logits, dim=-1) - 2 * lse[s:e]
            if want_entropy:  # H = -sum p log p, as the dense route computes it (lse - sum p * logits
                logp = logits.sub_(lse[s:e, None])  # would cancel two large numbers when H is small)
                entropy[s:e] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.post, ctx.dtype = chunk, post, dtype
        ctx.mark_non_differentiable(entropy, log_sum_sq)
        return token, entropy, log_sum_sq

    @staticmethod
    def backward(ctx, grad_token, _grad_entropy, _grad_sq):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, post, dtype = ctx.chunk, ctx.post, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g = grad_token.float()
        for s in range(0, hidden.size(0), chunk):
            e = min(s + chunk, hidden.size(0))
            h = hidden[s:e].to(dtype)
            z = F.linear(h, w, b).float()                                                 # (c, V)
            # d logits / d z, elementwise: the scale, and 1 - tanh^2 under a soft cap
            if post.mul is not None:
                z.mul_(post.mul)
            if post.div is not None:
                z.div_(post.div)
            if post.cap is not None:
                z.div_(post.cap).tanh_()
                dcap = 1 - z * z                                                          # (c, V)
                z.mul_(post.cap)
            # z is now the logits; turn it into d loss / d logits = g * (onehot(t) - p) in place
            grad = z.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
            grad[torch.arange(e - s, device=grad.device), targets[s:e]] += g[s:e]
            if post.cap is not None:
                grad.mul_(dcap)
                del dcap
            if post.div is not None:
                grad.div_(post.div)
            if post.mul is not None:
                grad.mul_(post.mul)
            # grad is d loss / d z: back through the linear layer
            if need_h:
                grad_h[s:e] = (grad.to(dtype) @ w).to(hidden.dtype)
            if need_w and dtype == torch.float32:
                grad_w.addmm_(grad.t(), h)  # accumulated in place: no (V, H) temporary per block
            elif need_w:
                grad_w += (grad.to(dtype).t() @ h).float()
            if need_b:
                grad_b += grad.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, *, chunk: int, post: HeadPost = _NO_POST,
                        dtype: torch.dtype | None = None, entropy: bool = False, log_sum_sq: bool = False):
    """log p(targets) (M,) float32 of the rows `hidden` (M, H) under the head (weight (V, H), bias
    (V,) or None, then `post`), `chunk` rows at a time; their entropies (M,) if `entropy` and
    log sum_v p(v)^2 (M,) if `log_sum_sq` (each else None), both without gradient. The head's
    matmul runs in `dtype` (default: the weight's). Autocast is off inside: the precision is the
    caller's choice, as with logprobs._FP32Head."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.autocast(hidden.device.type, enabled=False):
        token, ent, sq = _ChunkedLogps.apply(hidden, weight, bias, targets, int(chunk), post,
                                             dtype or weight.dtype, entropy, log_sum_sq)
    return token, (ent if entropy else None), (sq if log_sum_sq else None)
