import torch
import torch.nn.functional as F

from conftest import build_model
from preftune.core.logprobs import completion_logps, sequence_logps, split_pairs
from preftune.data.collate import collate_pairs
from preftune.data.tokenize import TokenizedPair


def _manual(model, batch):
    """Plain reference: full (N, T, V) logits, log-softmax, gather, sum over completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(logp, 2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * batch["completion_mask"][:, 1:]).sum(1)


PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], "x", 1),
         TokenizedPair([5], [11, 12, 13, 14, 2], [15, 2], "x", 2),
         TokenizedPair([3, 4, 5, 6, 7, 8], [9, 2], [9, 10, 11, 2], "x", 3)]


def test_matches_full_logits_computation():
    model = build_model(64).eval()
    batch = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        ours, counts = completion_logps(model, batch)
        ref = _manual(model, batch)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert counts.tolist() == [3, 5, 2, 2, 2, 4]


def test_padding_does_not_change_a_pair():
    model = build_model(64).eval()
    with torch.no_grad():
        alone, _ = completion_logps(model, collate_pairs(PAIRS[:1], pad_id=0))
        together, _ = completion_logps(model, collate_pairs(PAIRS, pad_id=0))
    chosen, rejected = split_pairs(together)
    assert torch.allclose(alone, torch.stack([chosen[0], rejected[0]]), atol=1e-5)


def test_sequence_logps_hand_example():
    """Two positions, vocab 2, uniform logits: each token has log p = log 0.5; row 0 counts both."""
    logits = torch.zeros(2, 2, 2)
    targets = torch.tensor([[0, 1], [1, 1]])
    mask = torch.tensor([[1, 1], [0, 1]])
    logps, counts = sequence_logps(logits, targets, mask)
    assert torch.allclose(logps, torch.tensor([2 * -0.693147, -0.693147]), atol=1e-6)
    assert counts.tolist() == [2, 1]
    assert F.cross_entropy(torch.zeros(1, 2), torch.tensor([0])).item() > 0  # sanity of the identity used


# ---- packing and prefix sharing: same numbers as the plain padded path ----------------------

def test_packed_layouts_equal_the_padded_path_in_value_and_gradient():
    import pytest

    from preftune.data.collate import collate_packed_pairs

    torch.manual_seed(0)
    results = {}
    for name, batch in (("padded", collate_pairs(PAIRS, pad_id=0)),
                        ("packed", collate_packed_pairs(PAIRS, prefix_sharing=False)),
                        ("prefix", collate_packed_pairs(PAIRS, prefix_sharing=True))):
        model = build_model(64)  # same seed -> same weights
        logps, counts = completion_logps(model, batch)
        logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[name] = (logps.detach(), counts, grads)
    base = results["padded"]
    for name in ("packed", "prefix"):
        assert torch.allclose(results[name][0], base[0], atol=1e-5), name
        assert results[name][1].tolist() == base[1].tolist() == [3, 5, 2, 2, 2, 4]
        assert torch.allclose(results[name][2], base[2], atol=1e-5), name
    with pytest.raises(AssertionError):  # the comparison can fail: a changed pair changes the numbers
        changed = [PAIRS[0], PAIRS[1], TokenizedPair([3, 4, 5, 6, 7, 9], [9, 2], [9, 10, 11, 2], "x", 3)]
        other, _ = completion_logps(build_model(64), collate_packed_pairs(changed))
        assert torch.allclose(other.detach(), base[0], atol=1e-5)


def test_prefix_sharing_mask_and_positions_hand_example():
    from preftune.data.collate import collate_packed_pairs

    b = collate_packed_pairs([TokenizedPair([5, 6], [8, 9], [10], "x", 1)], prefix_sharing=True)
    assert b["input_ids"].tolist() == [[5, 6, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # rejected restarts after the prompt
    from preftune.core.logprobs import dense_mask

    m = dense_mask(b)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0],
                 [1, 1, 0, 0, 1]]  # the rejected token sees the prompt and itself, never chosen
    # logits at position 1 (prompt end) predict chosen[0] and rejected[0]; position 2 predicts chosen[1]
    assert b["keep"].tolist() == [1, 2, 1] and b["targets"].tolist() == [8, 9, 10]
    assert b["seq_index"].tolist() == [0, 0, 1] and b["n_seqs"] == 2


def test_bf16_autocast_keeps_the_head_in_fp32_and_bounds_the_logp_error():
    from preftune.core.logprobs import autocast, chunk_lm_head, fp32_lm_head
    from preftune.data.collate import collate_packed_pairs

    model = build_model(64).eval()
    batch = collate_packed_pairs(PAIRS)
    chunk_lm_head(model, 0)  # the hook below reads the dense head's logits (the chunked head: test_logprobs_chunked.py)
    with torch.no_grad():
        exact, counts = completion_logps(model, batch)
        fp32_lm_head(model)
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with autocast("cpu", True):
            approx, _ = completion_logps(model, batch)
        hook.remove()
    assert seen == [torch.float32]  # logits and log-softmax in fp32 inside the bf16 region
    per_token = ((approx - exact).abs() / counts).max().item()
    assert 0 < per_token < 0.02  # bf16 changes the numbers, by less than 0.02 nats per token here
    assert "weight" in dict(model.get_output_embeddings().named_parameters())  # same parameters, same keys


def test_bf16_auto_is_on_for_a_cuda_device_with_bf16_and_off_on_cpu(monkeypatch):
    from preftune.core.logprobs import bf16_enabled

    assert [bf16_enabled(s, "cpu") for s in (True, False, "auto")] == [True, False, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert [bf16_enabled(s, "cuda") for s in (True, False, "auto")] == [True, False, True]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or a T4
    assert bf16_enabled("auto", "cuda") is False and bf16_enabled(True, "cuda") is True


def test_segment_sums_round_once_where_float32_index_add_rounds_every_token():
    """A completion of 4000 tokens near -2 nats each: its sum (about -8000) is float32's nearest value
    to the exact sum, where a float32 running sum drifts by many ulps (what put the 4096-token Gemma
    margins up to 3.5e-3 nats from float64)."""
    from preftune.core.logprobs import segment_sums

    g = torch.Generator().manual_seed(0)
    values = -(1.5 + torch.rand(4000, generator=g))                 # float32 per-token log-probs
    index = torch.tensor([0] * 4000)
    exact = values.double().sum()
    got = segment_sums(values, index, 1)
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert got[0] == exact.float()                                    # one rounding: the nearest float32
    naive = torch.zeros(1).index_add(0, index, values)[0].double()
    spacing = float(torch.finfo(torch.float32).eps) * 4096            # between float32 values near 8000
    assert abs(naive - exact) > 2 * spacing                            # the running float32 sum: 1.4e-3 off
    two = segment_sums(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]), 3)
    assert two.tolist() == [2.0, 5.0, 0.0]
