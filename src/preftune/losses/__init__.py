"""The loss registry: the single source of truth for loss names and their properties.

The training loop asks a spec (`needs_reference`, `paired`) and never tests a loss by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .dpo import sigmoid_dpo_loss
from .types import LossOutput

__all__ = ["LOSSES", "LossSpec", "LossOutput", "register_loss"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool  # the loop loads/uses a reference only when this is true
    paired: bool           # paired (prompt, chosen, rejected) data vs unpaired labels
    summary: str           # one line for --help and error messages


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, fn: Callable[..., LossOutput], *, needs_reference: bool,
                  paired: bool, summary: str) -> LossSpec:
    """Add a loss to the registry; a second registration of the same name is an error."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = spec = LossSpec(name, fn, needs_reference, paired, summary)
    return spec


register_loss("sigmoid", sigmoid_dpo_loss, needs_reference=True, paired=True,
              summary="DPO: -log sigmoid(beta * Delta) (Rafailov et al. 2023)")
