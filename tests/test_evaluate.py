"""evaluate.py: held-out metrics computed independently of the code under test."""

import math

import pytest
import torch

from conftest import PAIRS, build_model, write_jsonl
from preftune.data import load_records, tokenize_records
from preftune.data.collate import collate_pairs
from preftune.evaluate import evaluate_pairs
from preftune.losses import LOSSES
from preftune.models import FrozenCopyReference


def test_perplexity_and_accuracy_match_a_direct_computation(tmp_path, tokenizer):
    pairs, _ = tokenize_records(load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS[:4])), tokenizer,
                                max_length=64, max_prompt_length=32)
    model = build_model(len(tokenizer), seed=1).eval()
    result = evaluate_pairs(model, FrozenCopyReference(build_model(len(tokenizer), seed=2).eval()),
                            LOSSES["sigmoid"], pairs, loss_kwargs={"beta": 0.1}, batch_size=3, pad_id=0)
    with torch.no_grad():
        batch = collate_pairs(pairs, pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        seq = (logp * batch["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = seq[:4], seq[4:]
    tokens = sum(len(p.chosen_ids) for p in pairs)
    assert result["pairs"] == 4
    assert result["perplexity/chosen"] == pytest.approx(math.exp(-chosen.sum().item() / tokens), rel=1e-5)
    assert result["accuracy/logp"] == pytest.approx((chosen > rejected).float().mean().item())
    assert result["logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
