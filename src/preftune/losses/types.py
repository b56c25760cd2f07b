"""Shared loss types: every loss returns a LossOutput of per-example tensors of shape (B,)."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LossOutput"]


class LossOutput(NamedTuple):
    losses: torch.Tensor            # (B,) per-pair loss; the loop takes the mean
    chosen_rewards: torch.Tensor    # (B,) beta * (policy - reference) logps, detached, for logging
    rejected_rewards: torch.Tensor  # (B,)
