"""Per-sequence summed completion log-probs and token counts: the one place they are computed.

Training, evaluation, reference scoring and the demo all call `completion_logps`. Chosen and
rejected rows travel in one batch (see data/collate.py), so they share one forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..utils.devices import place
from .attention import uses_block_attention
from .chunking import block_tokens
from .lmhead import chunked_token_logps, head_post

__all__ = ["segment_sums", "sliding_window", "dense_mask", "packed_attention_mask", "completion_logps", "completion_token_logps",
           "completion_token_logps_and_entropy", "pair_logps", "sequence_scores", "sequence_logps", "split_pairs",
           "fp32_lm_head", "autocast", "bf16_enabled", "chunk_lm_head", "DEFAULT_CHUNK_TOKENS"]

# Completion positions per block of the chunked LM head (lmhead.py); 0 = the dense head. What a
# model that train() has not configured (chunk_lm_head) gets: eval, the apps. Equal to the default
# of train.logprob_chunk_tokens: config.py does not import this module (it would load torch for
# every command, config loads without it), so a test holds the two equal.
DEFAULT_CHUNK_TOKENS = 1024


class _FP32Head(torch.nn.Linear):
    """The LM head run in float32 even inside a bf16 autocast region: logits and log-softmax
    over a 50k vocabulary are where bf16's 8-bit mantissa costs the most."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def segment_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sequence sums (n,) float32 of per-token `values` (M,) whose sequence is `index` (M,),
    accumulated in float64. index_add adds in token order on the CPU, so in float32 a completion's
    running sum of a few thousand log-probs (some thousands of nats) rounds at every token: on
    Gemma 3 at 4096 tokens per pair that put DPO's log-ratio margins 0.5e-3 to 3.5e-3 nats from
    float64 and the loss 1.2e-4 from it (benchmarks/scaling/agreement.py). Accumulated in float64
    and rounded once, a sum is as exact as float32 holds it. MPS has no float64: float32 there."""
    wide = torch.float32 if values.device.type == "mps" else torch.float64
    return torch.zeros(n, dtype=wide, device=values.device).index_add(0, index, values.to(wide)).float()


def fp32_lm_head(model) -> None:
    """Make `model`'s output projection compute in float32 (class swap: same parameters and
    state-dict keys, so saving and loading are unchanged)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.__class__ = _FP32Head


def chunk_lm_head(model, tokens: int) -> None:
    """Route `model`'s per-token log-probs through the chunked head, `tokens` completion positions
    per block (0: the dense head). Like fp32_lm_head, a setting of the head module itself (a plain
    attribute: no parameter, no state-dict key), so it reaches every caller of this module without
    a config object passing through them (STYLE rule 12)."""
    head = _output_head(model)
    if head is not None:
        head.logprob_chunk_tokens = int(tokens)


def bf16_enabled(setting: bool | str, device_type: str) -> bool:
    """train.autocast_bf16 resolved on a device: true/false as given; "auto" is on for a CUDA device
    with bf16 arithmetic (what a GPU user expects, and TRL's default) and off everywhere else (on
    CPU it is faster only with AVX512-BF16 or AMX, and the exactness checks against TRL are fp32)."""
    if setting == "auto":
        return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def autocast(device_type: str, enabled: bool):
    """bf16 autocast for the transformer body when `enabled` (see fp32_lm_head for the head)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum log p(target) over masked positions of each row.

    logits (N, K, V) predict targets (N, K); mask (N, K) marks completion tokens.
    Returns logps (N,) float32 and token counts (N,) long. Only masked positions go through the
    log-softmax (float32), so prompt and padding positions cost nothing here.
    """
    mask = mask.bool()
    selected = logits[mask].float()                                     # (M, V)
    token_logps = -F.cross_entropy(selected, targets[mask], reduction="none")  # (M,)
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logps = segment_sums(token_logps, rows, mask.size(0))
    return logps, mask.sum(dim=1)


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward `batch` (input_ids, attention_mask, completion_mask of shape (N, T)).

    Position t predicts token t+1, so the LM head is asked only for positions from the first
    completion token of the batch minus one (`logits_to_keep`): prompt positions before it
    never reach the head, and of the K kept positions only completion ones go through the
    log-softmax (`_kept_token_logps`). Returns summed completion logps (N,) and counts (N,).
    """
    batch = place(batch, model)  # collators build on the CPU; the model may live elsewhere
    if "seq_index" in batch:
        return _packed_logps(model, batch)
    inputs, targets, mask = _padded_inputs(batch)
    token_logps = _kept_token_logps(model, inputs, targets, mask)[0]                  # (M,)
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logps = segment_sums(token_logps, rows, mask.size(0))
    return logps, mask.sum(dim=1)


def pair_logps(model, batch: dict, *, tails: bool = False, wpo_weights: bool = False):
    """`completion_logps` of a paired batch [chosen..., rejected...] (padded or packed rows, the same
    sums bit for bit) and, from the same forward's per-token log-probs, what LD-DPO and WPO read,
    each computed only when asked. Returns logps (N,), counts (N,) and a dict of (N,) tensors:

    - "tail_logps": the summed log-probs of a completion's tokens beyond the length of the
      shorter completion of its pair (0 for the shorter one, and for equal lengths);
    - "wpo_weights": exp of the mean over the completion's tokens of log p(y_t) - log sum_v p(v)^2,
      detached (WPO's aligned weight: every token counts as if sampled, the length normalises).

    Worked example: chosen tokens log p = [-1, -2, -3], rejected [-0.5, -0.5]: the shared length is
    2, so the chosen tail is -3 and the rejected tail 0; the sums are -6 and -1.
    """
    batch = place(batch, model)
    if "seq_index" in batch:
        token_logps, _, log_sum_sq = _packed_token_logps(model, batch, log_sum_sq=wpo_weights)
        rows, n = batch["seq_index"], int(batch["n_seqs"])
    else:
        inputs, targets, mask = _padded_inputs(batch)
        token_logps, _, log_sum_sq = _kept_token_logps(model, inputs, targets, mask, log_sum_sq=wpo_weights)
        rows, n = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask], mask.size(0)
    sums = lambda values: segment_sums(values, rows, n)  # noqa: E731
    counts = torch.bincount(rows, minlength=n)
    extras = {}
    if tails:
        chosen_n, rejected_n = split_pairs(counts)
        shared = torch.minimum(chosen_n, rejected_n).repeat(2)              # (N,) both sides of a pair
        beyond = (_positions(rows, counts) >= shared[rows]).to(token_logps.dtype)
        extras["tail_logps"] = sums(token_logps * beyond)
    if wpo_weights:
        aligned = token_logps.detach() - log_sum_sq
        extras["wpo_weights"] = torch.exp(sums(aligned) / counts.clamp(min=1))
    return sums(token_logps), counts, extras


def _positions(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each flat token's index within its completion (M,): its tokens are in order in the row, but
    packed rows need not hold the completions in index order (a pair's chosen and rejected sit
    together), so tokens are grouped by completion with a stable sort first."""
    order = torch.sort(rows, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(rows)
    pos[order] = torch.arange(rows.numel(), device=rows.device) - starts[rows[order]]
    return pos


def _padded_inputs(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Model inputs of padded rows with `logits_to_keep` = K positions from the batch's first
    completion token minus one, and the (N, K) targets and bool mask of completion tokens there."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    first = int(completion_mask.float().argmax(dim=1).min().clamp(min=1))  # earliest completion token
    keep = torch.arange(first - 1, input_ids.size(1) - 1, device=input_ids.device)  # (K,)
    inputs = dict(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False)
    return inputs, input_ids[:, keep + 1], completion_mask[:, keep + 1].bool()


def sequence_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of padded rows (collate_pairs/collate_sequences): the model's own
    sequence-classification head, pooled where the model pools (the last non-pad token), so
    training and scoring (rewards.RewardModel) read the same position. Returns scores (N,)
    float32 and completion token counts (N,). Packed rows are not supported (the head pools
    one sequence per row)."""
    batch = place(batch, model)
    if "seq_index" in batch:
        raise ValueError("reward-model scores need padded rows (data.layout=padded)")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, 0].float(), batch["completion_mask"].sum(dim=1)


def completion_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of padded rows (collate_sequences): (N, K) log p of each completion
    token and the (N, K) mask that marks them, K the positions from the batch's first completion
    token on (as in `completion_logps`, the LM head never sees earlier positions). Rollout losses
    (GRPO) need tokens, not sums; summing the masked values gives `completion_logps` exactly."""
    token_logps, _, mask = _token_rows(model, batch, entropy=False)
    return token_logps, mask


def completion_token_logps_and_entropy(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`completion_token_logps` and, from the same forward and the same head blocks, the entropy
    of the model's next-token distribution at each completion token (N, K), zero off the mask:
    a metric for the RL losses (detached: it carries no gradient)."""
    return _token_rows(model, batch, entropy=True)


def _token_rows(model, batch: dict, *, entropy: bool):
    """(N, K) per-token log-probs, entropies (None unless asked) and mask of padded or packed rows."""
    batch = place(batch, model)
    if "seq_index" in batch:  # packed (GRPO: a group's prompt once, its completions after it)
        token_logps, token_entropy, _ = _packed_token_logps(model, batch, entropy=entropy)
        seq, n = batch["seq_index"], int(batch["n_seqs"])
        out, mask = _unflatten(token_logps, seq, n)
        return out, (None if token_entropy is None else _unflatten(token_entropy, seq, n)[0]), mask
    inputs, targets, mask = _padded_inputs(batch)
    token_logps, token_entropy, _ = _kept_token_logps(model, inputs, targets, mask, entropy=entropy)
    rows = lambda flat: torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)  # noqa: E731
    return rows(token_logps), (None if token_entropy is None else rows(token_entropy)), mask


def _kept_token_logps(model, inputs: dict, targets: torch.Tensor, mask: torch.Tensor, *, entropy: bool = False,
                      log_sum_sq: bool = False):
    """One forward of `inputs` (which carry `logits_to_keep`: K positions per row): log p of
    targets[mask] (M,) float32 in row-major order of `mask` (N, K), their entropies (M,) and
    log sum_v p(v)^2 (M,) if asked (else None; both without gradient). The only place per-token
    log-probs are computed.

    Through the chunked head (lmhead.py, `chunk_lm_head`) where the head is a plain linear layer
    and the architecture is one whose post-head ops we know; else (the setting at 0, a LoRA- or
    4-bit-wrapped head, an unread architecture) through the model's own (N, K, V) logits."""
    head, post, chunk = _chunk_plan(model)
    if head is None:
        logits = model(**inputs).logits[mask].float()                                  # (M, V)
        token_logps = -F.cross_entropy(logits, targets[mask], reduction="none")
        if not (entropy or log_sum_sq):
            return token_logps, None, None
        with torch.no_grad():
            logp = torch.log_softmax(logits, dim=-1)
            return (token_logps, -(logp.exp() * logp).sum(-1) if entropy else None,
                    torch.logsumexp(2 * logp, dim=-1) if log_sum_sq else None)
    got = []
    fp32 = isinstance(head, _FP32Head) or head.weight.dtype == torch.float32

    def forward(x):  # replaces the head's forward for this one call: x (N, K, H), the kept positions
        got.append(chunked_token_logps(x[mask], head.weight, head.bias, targets[mask], chunk=chunk, post=post,
                                       dtype=torch.float32 if fp32 else head.weight.dtype, entropy=entropy,
                                       log_sum_sq=log_sum_sq))
        return x.new_zeros(x.shape[:-1] + (0,))  # empty logits: the model's post-head ops cost nothing
    with _forward_replaced(head, forward):
        model(**inputs)
    if len(got) != 1:
        raise RuntimeError(f"the LM head ran {len(got)} times in one forward of {type(model).__name__}; "
                           "set train.logprob_chunk_tokens=0 (the dense head)")
    return got[0]


def _unwrapped(model):
    """`model` inside DDP: its forward still runs through DDP, only the head and config are read inside."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _output_head(model):
    """The output projection of `model` (through PEFT and DDP wrappers), or None."""
    getter = getattr(_unwrapped(model), "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _chunk_plan(model):
    """(head, post, chunk) for the chunked route, or (None, None, 0) for the dense one."""
    head = _output_head(model)
    # the exact class: a head FSDP2 wrapped on its own is an FSDPLinear subclass, resharded after
    # its forward and gathered again by hooks on its output, which the chunked route leaves out of
    # the graph: its backward would read a freed weight. Such heads (and LoRA/4-bit ones) stay dense.
    if type(head) not in (torch.nn.Linear, _FP32Head):
        return None, None, 0
    chunk = block_tokens(getattr(head, "logprob_chunk_tokens", DEFAULT_CHUNK_TOKENS), head.weight.shape[0])
    post = head_post(getattr(_unwrapped(model), "config", None))
    return (None, None, 0) if chunk <= 0 or post is None else (head, post, chunk)


@contextmanager
def _forward_replaced(module, forward):
    """`module.forward` is `forward` inside (an instance attribute: the module's registered hooks
    still run around it; a hook that itself replaced `forward`, as accelerate's device-map hooks
    do, is bypassed, and preftune places no such hook); the previous one after."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _unflatten(token_logps: torch.Tensor, seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values of a packed row -> (n, K) rows and their mask. Each sequence's tokens
    are contiguous and in order in the row; sequences appear in index order (collate_packed with
    indices assigned in row order, as the GRPO source does)."""
    if seq.numel() and bool((seq[1:] < seq[:-1]).any()):
        raise ValueError("packed sequences must appear in index order for per-token log-probs")
    counts = torch.bincount(seq, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(seq.numel(), device=seq.device) - starts[seq]
    width = int(counts.max()) if n else 0
    out = torch.zeros((n, width), dtype=token_logps.dtype, device=token_logps.device).index_put((seq, col), token_logps)
    mask = torch.zeros((n, width), dtype=torch.bool, device=seq.device).index_put((seq, col), torch.ones_like(seq, dtype=torch.bool))
    return out, mask


def sliding_window(config) -> int | None:
    """The attention window of a model that has sliding-window layers, else None."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def dense_mask(batch: dict) -> torch.Tensor:
    """The (1, 1, T, T) bool mask (True = attend) that a packed batch's segments stand for: what
    a model without block attention is given (logprobs.packed_attention_mask)."""
    pos = batch["position_ids"][0]
    t = pos.numel()
    mask = torch.zeros((t, t), dtype=torch.bool, device=pos.device)
    for q0, q1, ranges in batch["segments"]:
        for a, b in ranges:
            mask[q0:q1, a:b] = pos[a:b][None, :] <= pos[q0:q1][:, None]
    return mask[None, None]


def packed_attention_mask(model, batch: dict, dtype: torch.dtype):
    """The additive 4D mask of a packed row, as the model's own attention expects it.

    A custom 4D mask replaces the model's mask construction, so a sliding window must be built
    into it: a key more than `window - 1` positions behind the query (by position ids, which
    restart per sequence and continue from the prompt under prefix sharing) is masked on
    sliding layers. Models that mix layer types (Gemma 2/3, Qwen 2/3) take one mask per type.
    """
    mask = dense_mask(batch)  # (1, 1, T, T) bool: same sequence and causal
    additive = lambda m: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)  # noqa: E731
    config = getattr(model, "config", None)
    window = sliding_window(config)
    if window is None:
        return additive(mask)
    pos = batch["position_ids"][0]                                          # (T,)
    windowed = mask & ((pos[:, None] - pos[None, :]) < window)[None, None]  # (1, 1, T, T)
    types = set(getattr(config, "layer_types", None) or [])
    if types and types <= {"full_attention", "sliding_attention"}:
        return {"full_attention": additive(mask), "sliding_attention": additive(windowed)}
    return additive(windowed)


def _packed_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed row (data/collate.collate_packed): summed completion logps and counts per sequence."""
    token_logps = _packed_token_logps(model, batch)[0]
    n, seq = int(batch["n_seqs"]), batch["seq_index"]
    logps = segment_sums(token_logps, seq, n)
    return logps, torch.bincount(seq, minlength=n)


def _packed_token_logps(model, batch: dict, *, entropy: bool = False, log_sum_sq: bool = False):
    """log p of every completion token of a packed row, flat in row order (and entropies and
    log sum_v p(v)^2 if asked, else None): the LM head runs only at `keep`, the positions that predict completion tokens, so
    no prompt position reaches it."""
    if uses_block_attention(model):  # segments, no (T, T) mask (attention.py)
        # a 4D placeholder: transformers passes a prepared 4D mask through instead of building one
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch["input_ids"].device)
        inputs = dict(attention_mask=placeholder, packed_segments=(batch["segments"], batch["position_ids"][0]))
    else:
        dtype = next(p for p in model.parameters()).dtype
        inputs = dict(attention_mask=packed_attention_mask(model, batch, dtype))
    inputs.update(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=batch["keep"],
                  use_cache=False)
    targets = batch["targets"][None]                                                   # (1, K)
    return _kept_token_logps(model, inputs, targets, torch.ones_like(targets, dtype=torch.bool), entropy=entropy,
                             log_sum_sq=log_sum_sq)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...)."""
    return x.chunk(2, dim=0)
