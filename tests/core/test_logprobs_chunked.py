"""The chunked LM head (core/lmhead.py, routed by core/logprobs.py) against the dense head: equal
values and gradients (hidden states, head weight, head bias) within fp32 tolerance, for chunks
smaller than, equal to and larger than the tokens, tied and untied heads, a bias, soft-capping and
logit scaling, over the ten-architecture matrix (tests/test_arch_matrix.py) plus the three
architectures that carry a bias or a scale (phi, cohere, granite)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_arch_matrix import ARCHS, _configs

import preftune.core.logprobs as lp
from preftune.core.lmhead import HeadPost, chunked_token_logps, head_post
from preftune.core.logprobs import (
    chunk_lm_head,
    completion_logps,
    completion_token_logps,
    completion_token_logps_and_entropy,
)
from preftune.data.collate import collate_packed, collate_packed_pairs, collate_pairs
from preftune.data.tokenize import TokenizedPair

TOL = 1e-6  # relative, in norm: ||chunked - dense|| <= TOL * ||dense||
VOCAB = 97

PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], "x", 1),
         TokenizedPair([5], [11, 12, 13, 14, 2], [15, 2], "x", 2),
         TokenizedPair([3, 4, 5, 6, 7, 8], [9, 2], [9, 10, 11, 2], "x", 3)]
TOKENS = 18  # completion tokens of PAIRS (chosen and rejected)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return bool((a - b).norm() <= tol * b.norm()) or bool(torch.equal(a, b))


def _post_ref(post: HeadPost, z: torch.Tensor) -> torch.Tensor:
    """The post-head ops as the models write them (out of place, through autograd)."""
    z = z * post.mul if post.mul is not None else z
    z = z / post.div if post.div is not None else z
    return torch.tanh(z / post.cap) * post.cap if post.cap is not None else z


# ---- the autograd function alone ------------------------------------------------------------

@pytest.mark.parametrize("post", [HeadPost(), HeadPost(cap=3.0), HeadPost(mul=0.7), HeadPost(div=4.0)],
                         ids=["plain", "softcap", "mul", "div"])
@pytest.mark.parametrize("chunk", [1, 5, 37, 50])  # < M, < M (uneven last block), == M, > M
@pytest.mark.parametrize("bias", [True, False])
def test_function_equals_dense_head_in_value_entropy_and_gradients(post, chunk, bias):
    torch.manual_seed(0)
    m, h, v = 37, 16, 101
    hidden = torch.randn(m, h, requires_grad=True)
    weight = (torch.randn(v, h) * 2).requires_grad_()  # logits of several units: the cap bites
    b = torch.randn(v, requires_grad=True) if bias else None
    targets, g = torch.randint(0, v, (m,)), torch.randn(m)
    token, entropy, _ = chunked_token_logps(hidden, weight, b, targets, chunk=chunk, post=post, entropy=True)
    (token * g).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    logits = _post_ref(post, F.linear(hidden, weight, b))
    dense = -F.cross_entropy(logits, targets, reduction="none")
    (dense * g).sum().backward()
    logp = logits.detach().log_softmax(-1)
    assert _close(token.detach(), dense.detach())
    assert _close(entropy, -(logp.exp() * logp).sum(-1))
    assert not entropy.requires_grad  # a metric: no gradient through it
    for mine, theirs in zip(ours, [t.grad for t in (hidden, weight, b) if t is not None]):
        assert _close(mine, theirs)


def test_function_skips_gradients_nobody_asked_for():
    """A frozen head (LoRA elsewhere): no (V, H) gradient is built, and the hidden states still get theirs."""
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(11, 4)
    token, _, _ = chunked_token_logps(hidden, weight, None, torch.arange(6), chunk=4)
    token.sum().backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


# ---- through the models ------------------------------------------------------------------

def _model(arch: str, *, tied: bool = True):
    import transformers as tf

    configs = _configs(VOCAB, 2, 0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    configs["phi"] = tf.PhiConfig(**common)  # its head has a bias
    configs["cohere"] = tf.CohereConfig(**common, logit_scale=0.5)  # logits * logit_scale
    configs["granite"] = tf.GraniteConfig(**common, logits_scaling=3.0)  # logits / logits_scaling
    config = configs[arch]
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # no dropout (gpt2): gradients still flow


def _run(model, batch, chunk: int, per_token: bool):
    """Value and every parameter's gradient of a weighted sum of the log-probs."""
    chunk_lm_head(model, chunk)
    model.zero_grad(set_to_none=True)
    if per_token:
        value, mask = completion_token_logps(model, batch)
        weights = torch.linspace(-1.0, 2.0, mask.numel()).view(mask.shape)
    else:
        value, _ = completion_logps(model, batch)
        weights = torch.linspace(-1.0, 2.0, value.numel())
    (value * weights).sum().backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, batch, per_token: bool, chunks=(1, 4, TOKENS, TOKENS + 7)):
    dense_value, dense_grads = _run(model, batch, 0, per_token)
    head = model.get_output_embeddings()
    assert {n for n, p in model.named_parameters() if p is head.weight} <= set(dense_grads)  # the head learns
    for chunk in chunks:
        value, grads = _run(model, batch, chunk, per_token)
        assert (value - dense_value).abs().max() <= TOL * dense_value.abs().max(), (chunk, value, dense_value)
        assert grads.keys() == dense_grads.keys()
        for name, grad in grads.items():
            assert _close(grad, dense_grads[name]), (chunk, name, (grad - dense_grads[name]).norm())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS + ["phi", "cohere", "granite"])
def test_architectures_equal_the_dense_head(arch, tied, monkeypatch):
    model = _model(arch, tied=tied)
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert (head.bias is not None) == (arch == "phi")
    calls = []
    real = lp.chunked_token_logps
    monkeypatch.setattr(lp, "chunked_token_logps", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    _assert_same(model, collate_pairs(PAIRS, pad_id=0), per_token=False)
    _assert_same(model, collate_packed_pairs(PAIRS, prefix_sharing=True), per_token=False)
    _assert_same(model, collate_pairs(PAIRS, pad_id=0), per_token=True, chunks=(3, TOKENS + 1))
    assert calls == [1, 4, TOKENS, TOKENS + 7] * 2 + [3, TOKENS + 1]  # the chunked route ran, never the dense one


def test_soft_capping_bites_and_a_dropped_cap_would_be_caught():
    """Gemma 2 with a head scaled so raw logits reach 5-10x the cap (15): the capped numbers are far
    from the uncapped ones, the chunked head equals the dense one, and a chunked head that forgot
    the cap would fail the comparison."""
    model = _model("gemma2", tied=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)
    batch = collate_pairs(PAIRS, pad_id=0)
    _assert_same(model, batch, per_token=False)
    chunk_lm_head(model, 4)
    with torch.no_grad():
        capped, _ = completion_logps(model, batch)
        model.config.final_logit_softcapping = None
        uncapped, _ = completion_logps(model, batch)
    assert (capped - uncapped).abs().min() > 1.0


def test_bias_gradient_reaches_the_bias():
    """A Llama whose head is given a bias (the model calls lm_head(h): the bias is part of it)."""
    model = _model("llama", tied=False)
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_(0, 3.0)
    _assert_same(model, collate_pairs(PAIRS, pad_id=0), per_token=False)
    _, grads = _run(model, collate_pairs(PAIRS, pad_id=0), 4, per_token=False)
    assert grads["lm_head.bias"].abs().sum() > 0


def test_entropy_from_the_same_blocks_equals_the_full_distribution():
    model = _model("gemma2").eval()
    groups = [([5, 6, 7], [(0, [8, 9, 2]), (1, [10, 2])]), ([3, 4], [(2, [11, 12, 13, 2])])]
    for batch in (collate_pairs(PAIRS, pad_id=0), collate_packed(groups, 3, prefix_sharing=True)):
        with torch.no_grad():
            chunk_lm_head(model, 0)
            dense = completion_token_logps_and_entropy(model, batch)
            chunk_lm_head(model, 2)
            ours = completion_token_logps_and_entropy(model, batch)
        assert torch.equal(ours[2], dense[2])
        for a, b in zip(ours[:2], dense[:2]):
            assert _close(a, b)
        assert torch.equal(ours[0], completion_token_logps(model, batch)[0])  # the same numbers as without entropy
        assert (ours[1][ours[2]] > 0).all() and (ours[1][~ours[2]] == 0).all()
    # by hand on the padded batch: the entropy of softmax(full logits) at each completion token
    batch = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
        _, entropy, mask = completion_token_logps_and_entropy(model, batch)
    full = -(logp.exp() * logp).sum(-1)[:, -mask.size(1):]
    assert _close(entropy[mask], full[mask])


def test_memory_is_one_block_of_vocabulary_rows():
    """No tensor with the vocabulary as its last dimension has more than `chunk` rows, forward or
    backward, under the chunked head; the dense head builds one with every kept position."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == VOCAB and t.size(-2) != 32:
                    self.rows = max(self.rows, t.numel() // VOCAB)  # (the head weight's (H=32, V) views aside)
            return out

    model = _model("gemma2", tied=False)
    model.get_input_embeddings().weight.requires_grad_(False)  # (V, H) only from the head below
    batch = collate_pairs(PAIRS, pad_id=0)
    # dense: N = 6 rows x K = 9 kept positions (T = 10; the shortest prompt is one token)
    for chunk, most in ((4, 4), (0, 6 * 9)):
        chunk_lm_head(model, chunk)
        with Widest() as seen:
            completion_logps(model, batch)[0].sum().backward()
        assert seen.rows == most, (chunk, seen.rows)


def test_dense_route_where_the_chunked_one_does_not_apply(monkeypatch):
    """An architecture whose forward we have not read, a LoRA-wrapped head, a subclass of Linear
    (what FSDP2 makes of a head it shards: its weight is freed after forward) and the setting at 0
    all take the model's own logits (exact whatever the model does), never the chunked function."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(lp, "chunked_token_logps", lambda *a, **k: pytest.fail("chunked route taken"))
    batch = collate_pairs(PAIRS, pad_id=0)
    model = _model("llama")
    model.config.model_type = "some_new_arch"
    assert head_post(model.config) is None
    completion_logps(model, batch)
    model = get_peft_model(_model("llama", tied=False), LoraConfig(r=2, target_modules=["lm_head"]))
    completion_logps(model, batch)
    model = _model("llama")
    chunk_lm_head(model, 0)
    completion_logps(model, batch)
    model = _model("llama", tied=False)
    model.lm_head.__class__ = type("FSDPLinear", (torch.nn.Linear,), {})
    completion_logps(model, batch)


def test_lora_policy_and_fp32_head_under_bf16_autocast_equal_the_dense_head():
    """The usual run: LoRA on attention (the head frozen: its weight gets no gradient), bf16 autocast
    with the head in fp32 (fp32_lm_head). Chunked and dense are the same fp32 head: equal values and
    equal gradients at the head's input. Below it the body runs in bf16, where a 1e-7 difference
    can flip one rounding and move the adapters' gradients by bf16's resolution (~4e-3 relative;
    seen on qwen3 here), so those are held to 1e-2."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("qwen3"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lp.fp32_lm_head(model)
    at_head = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: args[0].register_hook(lambda g: at_head.append(g.clone())) and None)
    batch = collate_packed_pairs(PAIRS)
    results = []
    for chunk in (0, 5):
        chunk_lm_head(model, chunk)
        model.zero_grad(set_to_none=True)
        with lp.autocast("cpu", True):
            logps, _ = completion_logps(model, batch)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_grads), (ours, grads) = results
    assert model.get_output_embeddings().weight.grad is None and len(grads) == 8  # 2 layers x q, v x A, B
    assert _close(ours, dense) and _close(at_head[1], at_head[0])
    for name in grads:
        assert _close(grads[name], dense_grads[name], tol=1e-2), name


def test_train_chunked_equals_dense_and_the_key_is_checked(tmp_path, tiny_model_dir, monkeypatch):
    """Full fine-tuning (the tied head/embedding trains; frozen-copy reference): two optimizer steps
    with train.logprob_chunk_tokens=3 equal those with 0 (dense), metric for metric."""
    import json

    from conftest import PAIRS as TEXT_PAIRS
    from conftest import write_jsonl
    from preftune.config import load_config
    from preftune.training.train import train
    from preftune.utils.errors import ConfigError

    data = write_jsonl(tmp_path / "pairs.jsonl", TEXT_PAIRS)
    calls = []
    real = lp.chunked_token_logps
    monkeypatch.setattr(lp, "chunked_token_logps", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    rows = {}
    for chunk in (0, 3):
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}",
                                 f"run.output_dir={tmp_path / str(chunk)}", "data.max_length=64",
                                 "data.max_prompt_length=32", "model.lora=false", "train.lr=1e-3",
                                 "train.max_steps=2", "diagnostics.probe_every=0",
                                 f"train.logprob_chunk_tokens={chunk}"])
        train(cfg)
        rows[chunk] = [json.loads(x) for x in (tmp_path / str(chunk) / "metrics.jsonl").read_text().splitlines()]
        assert bool(calls) == bool(chunk) and set(calls) <= {3}  # policy and reference both chunked
    assert len(rows[0]) == len(rows[3]) == 2
    for dense, ours in zip(rows[0], rows[3]):
        scale = abs(dense["logps/chosen"])  # margins are differences of log-probs of this size
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert ours[key] == pytest.approx(dense[key], rel=1e-6, abs=1e-7 * scale), key
    with pytest.raises(ConfigError, match="logprob_chunk_tokens"):
        load_config(None, ["train.logprob_chunk_tokens=-1"])
    # models train() never configured (eval, the apps) get the config's default too
    assert load_config(None, []).train.logprob_chunk_tokens == lp.DEFAULT_CHUNK_TOKENS


def test_a_wide_vocabulary_caps_the_block_at_the_logits_budget(monkeypatch):
    """The block holds at most LOGITS_PER_BLOCK logits: with the budget at 3 rows of this model's
    vocabulary, a setting of 1024 runs 3-position blocks (the same numbers as the dense head)."""
    from preftune.core import chunking

    assert (chunking.block_tokens(1024, 49152), chunking.block_tokens(1024, 262144)) == (1024, 256)
    assert (chunking.block_tokens(0, 262144), chunking.block_tokens(1024, 0), chunking.block_tokens(8, 2**30)) == \
        (0, 1024, 1)
    model = _model("llama", tied=False)
    calls = []
    real = lp.chunked_token_logps
    monkeypatch.setattr(lp, "chunked_token_logps", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    monkeypatch.setattr(chunking, "LOGITS_PER_BLOCK", 3 * VOCAB + 1)
    _assert_same(model, collate_pairs(PAIRS, pad_id=0), per_token=False, chunks=(1024, 2))
    assert calls == [3, 2]
