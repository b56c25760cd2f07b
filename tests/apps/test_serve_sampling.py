"""apps/serve.py samples through the one sampler (models/sampler.py), like every online path: a
seeded request is the sampler's sample for that seed, greedy is the argmax continuation, and an
unseeded request draws a fresh seed."""

import torch

from conftest import build_model
from preftune.apps.serve import ChatModel
from preftune.models.sampler import sample


def _chat(tokenizer):
    model = build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    return ChatModel(model.eval(), tokenizer, "tiny", max_tokens_cap=64)


def _cut(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


def test_a_seeded_request_is_the_samplers_sample_for_that_seed(tokenizer):
    chat = _chat(tokenizer)
    ids = chat._prompt_ids([{"role": "user", "content": "hello there"}])
    new, text = chat._generate(ids, max_tokens=12, temperature=0.7, top_p=0.9, seed=5)
    want = sample(chat.model, [ids], n=1, max_new_tokens=12, seed=5, eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id, temperature=0.7, top_p=0.9)[0].completion
    assert new == _cut(want, tokenizer.eos_token_id) and len(new) > 0
    assert chat._generate(ids, max_tokens=12, temperature=0.7, top_p=0.9, seed=5)[0] == new  # repeats
    others = {tuple(chat._generate(ids, max_tokens=12, temperature=1.0, top_p=1.0, seed=None)[0]) for _ in range(4)}
    assert len(others) > 1  # no seed: a fresh one per request


def test_temperature_zero_is_the_argmax_continuation(tokenizer):
    chat = _chat(tokenizer)
    ids = chat._prompt_ids([{"role": "user", "content": "hello there"}])
    new, _ = chat._generate(ids, max_tokens=8, temperature=0.0, top_p=1.0, seed=None)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            token = int(chat.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            seq.append(token)
    assert new == seq[len(ids):]
