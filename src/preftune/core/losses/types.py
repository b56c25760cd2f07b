"""Shared loss types.

Paired losses return `LossOutput` of per-pair tensors (B,); unpaired losses (KTO) return
`UnpairedLossOutput` of per-example tensors (N,). `metrics` holds extra per-example or scalar
tensors a loss wants logged (ORPO log-odds, KTO's KL anchor), already detached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # annotations only: the registry (and the CLI's --help) must not pay torch's import
    import torch

__all__ = ["LossOutput", "UnpairedLossOutput", "SupervisedLossOutput"]


class LossOutput(NamedTuple):
    losses: torch.Tensor            # (B,) per-pair loss; the loop takes the mean
    chosen_rewards: torch.Tensor    # (B,) implicit reward of chosen, detached, for logging
    rejected_rewards: torch.Tensor  # (B,)
    metrics: dict = {}              # name -> detached tensor, (B,) or scalar


class UnpairedLossOutput(NamedTuple):
    losses: torch.Tensor   # (N,)
    rewards: torch.Tensor  # (N,) implicit reward of each example, detached
    metrics: dict = {}


class SupervisedLossOutput(NamedTuple):
    losses: torch.Tensor   # (N,) per-example share of the micro-batch's token-mean NLL
    metrics: dict = {}
