"""models/critic.py: PPO's critic from the starting weights, from a reward model, or on the
policy's own trunk; which parameters it trains."""

from types import SimpleNamespace

import pytest
import torch

from conftest import build_model
from preftune.config import ModelConfig
from preftune.models.critic import build_critic, trunk_of
from preftune.models.loading import apply_lora

IDS = torch.tensor([[5, 9, 11, 4, 7], [6, 3, 8, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _policy(lora=True):
    model = build_model(64)
    return apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora else model


def test_a_critic_from_the_reward_model_starts_as_its_scores():
    """InstructGPT's start: the critic's value at a row's last token is the reward model's score of
    that row (the fresh critic adapter is a no-op), and only its adapter and head train."""
    from transformers import LlamaForSequenceClassification

    policy = _policy()
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1}))
    rm.eval()
    critic, origin = build_critic(policy, ModelConfig(lora_r=4), shared=False, reward=SimpleNamespace(model=rm))
    assert origin == "reward model"
    values = critic(IDS, MASK)
    last = MASK.sum(1) - 1
    with torch.no_grad():
        scores = rm(input_ids=IDS, attention_mask=MASK).logits[:, 0]
    assert torch.allclose(values[torch.arange(2), last], scores, atol=1e-6)
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert rm.score.weight.data_ptr() != critic.head.weight.data_ptr()  # a copy: the reward model stays fixed


def test_a_critic_from_the_starting_weights_reads_the_policys_hidden_states():
    policy = _policy()
    critic, origin = build_critic(policy, ModelConfig(lora_r=4), shared=False, reward=None)
    assert origin == "starting weights"
    with torch.no_grad():
        want = trunk_of(policy)(input_ids=IDS, attention_mask=MASK).last_hidden_state
        got = critic.trunk(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert not any(p is q for p in critic.parameters() for q in policy.parameters())  # its own copy


def test_a_shared_critic_owns_only_its_head_and_full_fine_tuning_trains_the_whole_copy():
    policy = _policy()
    shared, _ = build_critic(policy, ModelConfig(), shared=True)
    assert sorted(n for n, _ in shared.named_parameters()) == ["head.bias", "head.weight"]
    with torch.no_grad():
        shared.head.weight.fill_(0.1)  # as after a first step: a zero head passes no gradient to the trunk
    (shared(IDS, MASK) * MASK).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in policy.named_parameters() if "lora_" in n)  # values train the adapter
    full, _ = build_critic(_policy(lora=False), ModelConfig(lora=False), shared=False)
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_a_new_value_head_starts_every_value_at_zero(shared):
    """A random head on real hidden states starts values units away from [0, 1] rewards (explained
    variance -13 measured on the arithmetic task); a zero head starts the first advantages at the
    discounted returns."""
    critic, _ = build_critic(_policy(), ModelConfig(lora_r=4), shared=shared, reward=None)
    with torch.no_grad():
        values = critic(IDS, MASK)
    assert values.shape == IDS.shape and torch.equal(values, torch.zeros_like(values))
    (critic(IDS, MASK) - 1.0).pow(2).mean().backward()
    assert critic.head.weight.grad.abs().sum() > 0  # it learns from the first step


def test_a_reward_model_of_another_vocabulary_is_not_used():
    from transformers import LlamaForSequenceClassification

    policy = _policy()
    other = LlamaForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(), "vocab_size": 70,
                                                                     "num_labels": 1}))
    _, origin = build_critic(policy, ModelConfig(lora_r=4), shared=False, reward=SimpleNamespace(model=other))
    assert origin == "starting weights"
