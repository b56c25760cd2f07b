"""logprobs.pair_logps: the paired forward's sums plus LD-DPO's tails and WPO's weights, from the
same per-token log-probs, in every layout and through both LM-head routes."""

import math

import pytest
import torch

from conftest import build_model
from preftune.core.lmhead import chunked_token_logps
from preftune.core.logprobs import chunk_lm_head, completion_logps, completion_token_logps, pair_logps
from preftune.data.collate import collate_packed_pairs, collate_pairs
from preftune.data.tokenize import TokenizedPair

# completion lengths (chosen, rejected): (3, 2), (5, 2), (2, 4): shared lengths 2, 2, 2
PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], "x", 1),
         TokenizedPair([5], [11, 12, 13, 14, 2], [15, 2], "x", 2),
         TokenizedPair([3, 4, 5, 6, 7, 8], [9, 2], [9, 10, 11, 2], "x", 3)]
LAYOUTS = {"padded": lambda pairs: collate_pairs(pairs, pad_id=0),
           "packed": lambda pairs: collate_packed_pairs(pairs, prefix_sharing=False),
           "packed_shared": lambda pairs: collate_packed_pairs(pairs, prefix_sharing=True)}


def test_log_sum_sq_hand_example():
    """Vocabulary of 2 with p = (0.8, 0.2): sum p^2 = 0.64 + 0.04 = 0.68, log 0.68 = -0.385662;
    the target 0 has log p = log 0.8 = -0.223144, so its aligned log-prob is log(0.8 / 0.68) = 0.162519."""
    weight = torch.tensor([[math.log(0.8)], [math.log(0.2)]])
    token, entropy, log_sum_sq = chunked_token_logps(torch.ones(1, 1), weight, None, torch.tensor([0]), chunk=1,
                                                     log_sum_sq=True)
    assert entropy is None
    assert log_sum_sq.item() == pytest.approx(-0.385662, abs=1e-6)
    assert (token - log_sum_sq).item() == pytest.approx(0.162519, abs=1e-6)
    assert not log_sum_sq.requires_grad


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tails_are_the_tokens_past_the_shorter_completion(layout):
    """Rows [chosen 0..2, rejected 0..2]; per-token log-probs of the padded rows give, by hand:
    pair 0 chosen tail = its 3rd token, pair 1 chosen tail = tokens 3..5, pair 2 rejected tail =
    tokens 3..4; every other tail is 0. The sums equal completion_logps' bit for bit."""
    model = build_model(64).eval()
    with torch.no_grad():
        tokens, mask = completion_token_logps(model, collate_pairs(PAIRS, pad_id=0))    # (6, K) padded
        rows = [tokens[i][mask[i]] for i in range(6)]
        batch = LAYOUTS[layout](PAIRS)
        logps, counts, extras = pair_logps(model, batch, tails=True)
        plain, plain_counts = completion_logps(model, batch)
    expected = torch.stack([rows[0][2:].sum(), rows[1][2:].sum(), torch.tensor(0.0),
                            torch.tensor(0.0), torch.tensor(0.0), rows[5][2:].sum()])
    assert counts.tolist() == plain_counts.tolist() == [3, 5, 2, 2, 2, 4]
    assert torch.equal(logps, plain)
    assert torch.allclose(extras["tail_logps"], expected, atol=1e-5)
    assert set(extras) == {"tail_logps"}


@pytest.mark.parametrize("chunk", [0, 1024], ids=["dense", "chunked"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wpo_weights_equal_a_full_logits_computation(layout, chunk):
    """w = exp(mean_t [log p(y_t) - log sum_v p(v)^2]) from the model's full logits, row by row."""
    model = build_model(64).eval()
    chunk_lm_head(model, chunk)
    padded = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        tok = torch.gather(logp, 2, padded["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        aligned = (tok - torch.logsumexp(2 * logp, dim=-1)) * padded["completion_mask"][:, 1:]
        expected = torch.exp(aligned.sum(1) / padded["completion_mask"].sum(1))
    logps, _, extras = pair_logps(model, LAYOUTS[layout](PAIRS), wpo_weights=True)
    assert torch.allclose(extras["wpo_weights"], expected, rtol=1e-5)
    assert not extras["wpo_weights"].requires_grad and logps.requires_grad  # a weight, not an objective
    assert set(extras) == {"wpo_weights"}


def test_tails_carry_the_gradient_of_their_tokens():
    """The LD-DPO loss trains through the tails: their gradient equals that of the same tokens' sum."""
    model = build_model(64)
    batch = collate_pairs(PAIRS, pad_id=0)
    _, _, extras = pair_logps(model, batch, tails=True)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(extras["tail_logps"].sum(), params, allow_unused=True)
    tokens, mask = completion_token_logps(model, batch)
    by_hand = tokens[0][mask[0]][2:].sum() + tokens[1][mask[1]][2:].sum() + tokens[5][mask[5]][2:].sum()
    theirs = torch.autograd.grad(by_hand, params, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
