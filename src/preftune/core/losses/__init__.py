"""The loss registry: the single source of truth for loss names and their properties.

Each loss has a kind (kinds.py: pairs, unpaired, demonstrations, rollouts, reward model) that
decides its data, its forward step, its metrics and the command that trains it; besides that, a
spec says whether the loss reads a reference (`needs_reference`), which settings it takes
(`params`) and whether it receives completion lengths. The training loop asks the spec and its
kind and never tests a loss by name. Config validation, `--help`, error messages and the contract
tests are all generated from `LOSSES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .kinds import DEMONSTRATIONS, KINDS, PAIRS, REWARD_MODEL, ROLLOUTS, UNPAIRED, Kind
from .types import LossOutput, SupervisedLossOutput, UnpairedLossOutput

_LAZY = {"RolloutLossOutput": "grpo", "group_advantages": "grpo"}


def __getattr__(name: str):
    """PEP 562: the GRPO helpers re-exported here load their module (and torch) on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOSSES", "ALIASES", "LossSpec", "Kind", "KINDS", "LossOutput", "UnpairedLossOutput", "SupervisedLossOutput", "RolloutLossOutput", "register_loss",
           "build_loss", "group_advantages"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    impl: Callable | str   # the loss function, or "module:function" of this package, imported on first use
    kind: Kind             # what it trains on and everything that follows (kinds.py)
    needs_reference: bool  # the loop loads/runs a reference only when this is true
    params: tuple          # LossConfig fields passed as keyword arguments
    needs_lengths: bool    # receives chosen_lengths / rejected_lengths (completion token counts)
    summary: str           # one line for --help and error messages
    uses: tuple = ()       # loss settings its batch source reads besides `params` (KTO's kto_auto_weights)

    @property
    def fn(self) -> Callable:
        """The loss function. The registry names its module instead of importing it, so that what only
        reads the registry (config validation, `preftune --help`) does not import torch (1.2 s)."""
        if callable(self.impl):
            return self.impl
        module, _, func = self.impl.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)


LOSSES: dict[str, LossSpec] = {}
ALIASES: dict[str, str] = {"dpo": "sigmoid"}  # other names users know a loss by; resolved in config


def register_loss(name: str, fn: Callable | str, *, kind: Kind, needs_reference: bool, summary: str,
                  params: tuple = ("beta",), needs_lengths: bool = False, uses: tuple = ()) -> LossSpec:
    """Add a loss of a registered kind; a second registration of the same name is an error."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    if KINDS.get(kind.name) is not kind:
        raise ValueError(f"loss {name!r}: {kind.name!r} is not a registered kind ({', '.join(KINDS)})")
    LOSSES[name] = spec = LossSpec(name, fn, kind, needs_reference, tuple(params), needs_lengths, summary,
                                   tuple(uses))
    return spec


def build_loss(name: str, mix: list | None = None) -> LossSpec:
    """The spec for `name`, or for a weighted sum of paired losses: mix = [[name, weight], ...].

    A mixture's rewards (for logging) are those of its first term; it needs a reference or
    lengths if any term does. Mixing paired with unpaired losses is refused.
    """
    if not mix:
        return LOSSES[ALIASES.get(name, name)]
    terms = [(LOSSES[n], float(w)) for n, w in mix]
    if not all(spec.kind.mixable for spec, _ in terms):
        raise ValueError(f"only losses of a mixable kind can be mixed ({', '.join(k for k, v in KINDS.items() if v.mixable)})")
    params = tuple(dict.fromkeys(p for spec, _ in terms for p in spec.params))
    needs_lengths = any(spec.needs_lengths for spec, _ in terms)

    def mixture(pc, pr, rc, rr, **kwargs) -> LossOutput:
        outs = []
        for spec, _ in terms:
            keys = spec.params + (("chosen_lengths", "rejected_lengths") if spec.needs_lengths else ())
            outs.append(spec.fn(pc, pr, rc, rr, **{k: kwargs[k] for k in keys}))
        losses = sum(w * o.losses for (_, w), o in zip(terms, outs))
        metrics = {f"loss/{spec.name}": o.losses.detach() for (spec, _), o in zip(terms, outs)}
        return LossOutput(losses, outs[0].chosen_rewards, outs[0].rejected_rewards, {**outs[0].metrics, **metrics})

    label = "+".join(f"{w:g}*{spec.name}" for spec, w in terms)
    return LossSpec(label, mixture, PAIRS, any(s.needs_reference for s, _ in terms), params, needs_lengths,
                    f"mixture {label}")


register_loss("sigmoid", "dpo:sigmoid_dpo_loss", kind=PAIRS, needs_reference=True,
              summary="DPO: -log sigmoid(beta * Delta) (Rafailov et al. 2023)")
register_loss("cdpo", "dpo:cdpo_loss", kind=PAIRS, needs_reference=True, params=("beta", "label_smoothing"),
              summary="conservative DPO with label smoothing eps (Mitchell 2023)")
register_loss("robust", "dpo:robust_dpo_loss", kind=PAIRS, needs_reference=True, params=("beta", "label_smoothing"),
              summary="robust DPO, unbiased under label noise eps (Chowdhury et al. 2024)")
register_loss("hinge", "dpo:hinge_loss", kind=PAIRS, needs_reference=True,
              summary="SLiC/RSO hinge relu(1 - beta * Delta)")
register_loss("ipo", "dpo:ipo_loss", kind=PAIRS, needs_reference=True, params=("beta", "ipo_length_normalize"),
              needs_lengths=True, summary="IPO (h - 1/(2 beta))^2 (Azar et al. 2023)")
register_loss("simpo", "reference_free:simpo_loss", kind=PAIRS, needs_reference=False, params=("beta", "simpo_gamma"),
              needs_lengths=True, summary="SimPO, length-normalized, no reference (Meng et al. 2024)")
register_loss("orpo", "reference_free:orpo_loss", kind=PAIRS, needs_reference=False, needs_lengths=True,
              summary="ORPO: NLL + beta * odds-ratio term, no reference (Hong et al. 2024)")
register_loss("sft", "reference_free:sft_loss", kind=PAIRS, needs_reference=False, params=(), needs_lengths=True,
              summary="NLL of the chosen completion (the RPO term when mixed)")
register_loss("kto", "kto:kto_loss", kind=UNPAIRED, needs_reference=True,
              params=("beta", "desirable_weight", "undesirable_weight"), uses=("kto_auto_weights",),
              summary="KTO on unpaired (prompt, completion, label) data (Ethayarajh et al. 2024)")
register_loss("grpo", "grpo:grpo_loss", kind=ROLLOUTS, needs_reference=True,
              params=("clip_epsilon", "clip_epsilon_high", "kl_coef", "grpo_token_level", "tis_cap"),
              summary="GRPO: clipped ratio x group advantage + k3 KL, online (Shao et al. 2024); preftune grpo")
register_loss("nll", "reference_free:nll_loss", kind=DEMONSTRATIONS, needs_reference=False, params=(),
              summary="SFT: token-mean NLL of the completion tokens of demonstrations; preftune sft")
register_loss("bt", "reward:bradley_terry_loss", kind=REWARD_MODEL, needs_reference=False,
              params=("rm_margin", "rm_center_coef"),
              summary="reward model: Bradley-Terry -log sigmoid(r_c - r_r - margin) + centering; preftune train-rm")
