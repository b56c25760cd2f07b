"""The order examples are visited in: reproducible from the seed and epoch alone, so that a
resumed run continues exactly where its checkpoint left off."""

from __future__ import annotations

import torch

__all__ = ["EpochSampler"]


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run sees the same
    order; `skip` drops the examples already consumed in the epoch being resumed. (Named
    `position`, not `set_epoch`: Accelerate calls `set_epoch` with its own counter, which
    would undo the resume position.)"""

    def __init__(self, n: int, seed: int | None):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.seed is None:  # file order
            return iter(range(self.skip, self.n))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 1000003 * self.epoch))
        return iter(order[self.skip:].tolist())

    def __len__(self) -> int:
        return self.n - self.skip
