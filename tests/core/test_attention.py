"""attention.py: packed rows attend by segments, equal to the dense-mask route and to single
sequences, on long rows, with and without sliding windows, and without a (T, T) mask."""

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from preftune.core.attention import (
    BLOCK,
    block_attention,
    segment_mask,
    use_block_attention,
    uses_block_attention,
)
from preftune.core.logprobs import completion_logps, dense_mask
from preftune.data.collate import collate_packed_pairs, collate_pairs, collate_sequences
from preftune.data.tokenize import TokenizedPair


def _long_pairs(n: int, prompt: int, chosen: int, rejected: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 60, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(prompt + 7 * i), ids(max(1, chosen - 5 * i)) + [2], ids(rejected + 3 * i) + [2], "x", i + 1)
            for i in range(n)]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sharing", [True, False])
def test_block_attention_equals_sdpa_with_the_dense_mask(window, sharing):
    batch = collate_packed_pairs(_long_pairs(3, 9, 6, 4), prefix_sharing=sharing)
    pos, t = batch["position_ids"][0], batch["position_ids"].size(1)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, t, 8, generator=g) for _ in range(3))
    mask = dense_mask(batch)[0, 0]
    if window:
        mask = mask & ((pos[:, None] - pos[None, :]) < window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = block_attention(q, k, v, batch["segments"], pos, scaling=0.3, window=window)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_segments_hand_example_and_no_dense_mask_in_the_batch():
    b = collate_packed_pairs([TokenizedPair([5, 6], [8, 9], [10], "x", 1)], prefix_sharing=True)
    # prompt + chosen is one causal span; rejected attends to the prompt and to itself
    assert b["segments"] == [(0, 4, [(0, 4)]), (4, 5, [(0, 2), (4, 5)])]
    assert "attention_mask" not in b
    assert segment_mask(torch.tensor([2, 3]), torch.tensor([0, 1, 2, 3]), 2).int().tolist() == [[0, 1, 1, 0],
                                                                                                 [0, 0, 1, 1]]


def test_long_packed_rows_equal_padded_and_single_sequences(tokenizer):
    """Rows of ~1.3k tokens through the tiny Llama (block attention) and through the dense-mask
    route: the same log-probs as padded rows and as each sequence alone."""
    model = build_model(64, seed=3)
    model.config.max_position_embeddings = 1024
    pairs = _long_pairs(3, 300, 120, 90)
    dense = build_model(64, seed=3)
    assert use_block_attention(model) and uses_block_attention(model) and not uses_block_attention(dense)
    model.eval()
    dense.eval()
    alone = torch.stack([completion_logps(model, collate_sequences([p.prompt_ids], [c], 0))[0][0]
                         for c_name in ("chosen_ids", "rejected_ids") for p in pairs for c in [getattr(p, c_name)]])
    with torch.no_grad():
        for sharing in (True, False):
            packed = collate_packed_pairs(pairs, prefix_sharing=sharing)
            block, _ = completion_logps(model, packed)
            dense_route, _ = completion_logps(dense, packed)
            assert (block - alone).abs().max() < 1e-4 and (block - dense_route).abs().max() < 1e-4
        padded, _ = completion_logps(model, collate_pairs(pairs, 0))
    assert (padded - alone).abs().max() < 1e-4


def test_gradients_through_block_attention_match_the_dense_route():
    pairs = _long_pairs(2, 40, 20, 15)
    block, dense = build_model(64, seed=4), build_model(64, seed=4)
    assert use_block_attention(block)
    batch = collate_packed_pairs(pairs, prefix_sharing=True)
    for m in (block, dense):
        completion_logps(m, batch)[0].sum().backward()
    for (name, a), (_, b) in zip(block.named_parameters(), dense.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_only_sdpa_models_switch():
    from transformers import LlamaConfig, LlamaForCausalLM

    eager = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attn_implementation="eager"))
    assert not use_block_attention(eager) and eager.config._attn_implementation == "eager"
    model = build_model(64)
    assert use_block_attention(model) and model.config._attn_implementation == BLOCK
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():  # an unpacked call is plain SDPA
        assert torch.allclose(model(input_ids=ids).logits, build_model(64)(input_ids=ids).logits)
