"""PPO's critic: a value head (hidden size -> 1) on a transformer trunk, one value per position.

Two forms (`ppo.shared_critic`):
- separate (default, as InstructGPT and OpenRLHF): a copy of the starting weights' trunk, its own
  LoRA adapter (or trained in full when the policy is), and a new value head; or, with a reward
  model as the reward (`online.reward=rm:DIR`, `ppo.critic_from_reward_model`), the reward model's
  trunk and score head, the usual initialisation. Memory: one more copy of the trunk's weights.
- shared: the value head on the policy's own trunk, adapters on. No second copy; the value loss
  also trains the policy's adapter, and values cost one more trunk forward (the LM head is not run).

The critic's trainable parameters are handed to train() by the PPO source (runs/online/ppo.py), so
they join the optimizer, the checkpoints and resume like the policy's.
"""

from __future__ import annotations

import copy

import torch

from ..utils.errors import ConfigError

__all__ = ["Critic", "build_critic", "trunk_of"]


def trunk_of(model):
    """The decoder of a causal LM or sequence-classification model (PEFT-wrapped or not), without
    its head: the module its `base_model_prefix` names (`model` on Llama, Qwen, Gemma, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class Critic(torch.nn.Module):
    """values(input_ids, attention_mask) -> (N, T) float32: the value head on the trunk's last
    hidden state at every position."""

    def __init__(self, trunk, head: torch.nn.Linear, *, shared: bool):
        super().__init__()
        if shared:  # the policy's own trunk: not a submodule, so its parameters are the policy's alone
            object.__setattr__(self, "_body", trunk)
        else:
            self.trunk = trunk
        self.head, self.shared = head, shared

    @property
    def body(self):
        return self._body if self.shared else self.trunk

    def forward(self, input_ids, attention_mask=None):
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def _new_head(hidden: int, like: torch.nn.Parameter) -> torch.nn.Linear:
    """A fresh value head with zero weights and bias: every value starts at 0.

    Zero, not random: a random head (N(0, 1/(hidden + 1)) weights) reads the trunk's last hidden
    state, whose norm is large on real models, so its first values are off by several units on
    rewards in [0, 1] (explained variance -13 on the arithmetic task, measured) and the first
    batches' GAE advantages are mostly that noise. With values 0 the first advantages are the
    discounted returns (REINFORCE), the explained variance starts at 0, and the head still gets
    its gradient at once ((V - R) times the hidden state); the trunk's adapter follows from the
    second step, once the head is non-zero."""
    head = torch.nn.Linear(hidden, 1, dtype=like.dtype, device=like.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def _reward_start(reward, policy_config):
    """The reward model's (trunk, score head) when it reads the policy's tokens (same vocabulary and
    width), else None."""
    rm = getattr(reward, "model", None)
    if rm is None or not hasattr(rm, "score"):
        return None
    c = rm.config
    if (getattr(c, "vocab_size", None), getattr(c, "hidden_size", None)) != \
            (getattr(policy_config, "vocab_size", None), getattr(policy_config, "hidden_size", None)):
        return None
    start = copy.deepcopy(rm)
    return trunk_of(start), start.score


def build_critic(policy, m, *, shared: bool, reward=None, from_reward_model: bool = True) -> tuple[Critic, str]:
    """The critic for `policy` (right after LoRA is applied, before any step), `m` the run's model
    settings. Returns it and how it started ("shared trunk", "reward model", "starting weights")."""
    hidden = policy.config.hidden_size
    like = next(p for p in policy.parameters())
    if shared:
        return Critic(trunk_of(policy), _new_head(hidden, like), shared=True), "shared trunk"
    if m.load_in_4bit:
        raise ConfigError("defaults", "ppo.shared_critic", "a separate critic would copy the 4-bit base; set "
                          "ppo.shared_critic=true with model.load_in_4bit")
    started = _reward_start(reward, policy.config) if from_reward_model else None
    if started is not None:
        trunk, head, origin = *started, "reward model"
        head = head.to(like.dtype)
    else:
        # the starting weights: a fresh adapter merges as a no-op (a kept SFT adapter merges in)
        base = copy.deepcopy(policy)
        base = base.merge_and_unload() if hasattr(base, "merge_and_unload") else base
        trunk, head, origin = trunk_of(base), _new_head(hidden, like), "starting weights"
    trunk.to(like.device)
    if m.lora:
        from peft import LoraConfig, inject_adapter_in_model  # deferred: only LoRA runs need peft

        targets = m.lora_target_modules if isinstance(m.lora_target_modules, str) else list(m.lora_target_modules)
        config = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=targets,
                            bias="none")
        trunk = inject_adapter_in_model(config, trunk)
        for name, p in trunk.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        trunk.requires_grad_(True)
    head.to(like.device).requires_grad_(True)
    return Critic(trunk, head, shared=False), origin
