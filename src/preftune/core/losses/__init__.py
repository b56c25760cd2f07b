"""The loss registry: the single source of truth for loss names and their properties.

The training loop asks a spec (`needs_reference`, `paired`, `needs_lengths`, `params`, `rollout`,
`supervised`, `reward_model`) and never tests a loss by name. Rollout losses (GRPO) score completions sampled from
the policy during the run, per token, with group advantages; only a rollout source (online/grpo.py)
feeds them. Supervised losses (SFT) score demonstrations; only `preftune sft` (sft.py) feeds them.
Reward-model losses train a sequence-classification head on pairs (`preftune train-rm`, rm.py).
Config validation, `--help`, error messages and the contract tests are all generated from `LOSSES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .types import LossOutput, SupervisedLossOutput, UnpairedLossOutput

_LAZY = {"RolloutLossOutput": "grpo", "group_advantages": "grpo"}


def __getattr__(name: str):
    """PEP 562: the GRPO helpers re-exported here load their module (and torch) on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOSSES", "ALIASES", "LossSpec", "LossOutput", "UnpairedLossOutput", "SupervisedLossOutput", "RolloutLossOutput", "register_loss",
           "build_loss", "group_advantages"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    impl: Callable | str   # the loss function, or "module:function" of this package, imported on first use
    needs_reference: bool  # the loop loads/runs a reference only when this is true
    paired: bool           # paired (prompt, chosen, rejected) vs unpaired (prompt, completion, label)
    params: tuple          # LossConfig fields passed as keyword arguments
    needs_lengths: bool    # receives chosen_lengths / rejected_lengths (completion token counts)
    summary: str           # one line for --help and error messages
    rollout: bool = False  # per-token loss on sampled completions with advantages (GRPO); not paired
    supervised: bool = False  # NLL of demonstrations (prompt, completion): `preftune sft`; not paired
    reward_model: bool = False  # paired, on the scores of a sequence-classification head: `preftune train-rm`
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


def register_loss(name: str, fn: Callable | str, *, needs_reference: bool, paired: bool, summary: str,
                  params: tuple = ("beta",), needs_lengths: bool = False, rollout: bool = False,
                  supervised: bool = False, reward_model: bool = False, uses: tuple = ()) -> LossSpec:
    """Add a loss to the registry; a second registration of the same name is an error."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = spec = LossSpec(name, fn, needs_reference, paired, tuple(params), needs_lengths, summary,
                                          rollout, supervised, reward_model, tuple(uses))
    return spec


def build_loss(name: str, mix: list | None = None) -> LossSpec:
    """The spec for `name`, or for a weighted sum of paired losses: mix = [[name, weight], ...].

    A mixture's rewards (for logging) are those of its first term; it needs a reference or
    lengths if any term does. Mixing paired with unpaired losses is refused.
    """
    if not mix:
        return LOSSES[ALIASES.get(name, name)]
    terms = [(LOSSES[n], float(w)) for n, w in mix]
    if not all(spec.paired and not spec.rollout and not spec.supervised and not spec.reward_model for spec, _ in terms):
        raise ValueError("only paired losses can be mixed")
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
    return LossSpec(label, mixture, any(s.needs_reference for s, _ in terms), True, params, needs_lengths,
                    f"mixture {label}")


register_loss("sigmoid", "dpo:sigmoid_dpo_loss", needs_reference=True, paired=True,
              summary="DPO: -log sigmoid(beta * Delta) (Rafailov et al. 2023)")
register_loss("cdpo", "dpo:cdpo_loss", needs_reference=True, paired=True, params=("beta", "label_smoothing"),
              summary="conservative DPO with label smoothing eps (Mitchell 2023)")
register_loss("robust", "dpo:robust_dpo_loss", needs_reference=True, paired=True, params=("beta", "label_smoothing"),
              summary="robust DPO, unbiased under label noise eps (Chowdhury et al. 2024)")
register_loss("hinge", "dpo:hinge_loss", needs_reference=True, paired=True,
              summary="SLiC/RSO hinge relu(1 - beta * Delta)")
register_loss("ipo", "dpo:ipo_loss", needs_reference=True, paired=True, params=("beta", "ipo_length_normalize"),
              needs_lengths=True, summary="IPO (h - 1/(2 beta))^2 (Azar et al. 2023)")
register_loss("simpo", "reference_free:simpo_loss", needs_reference=False, paired=True, params=("beta", "simpo_gamma"),
              needs_lengths=True, summary="SimPO, length-normalized, no reference (Meng et al. 2024)")
register_loss("orpo", "reference_free:orpo_loss", needs_reference=False, paired=True, needs_lengths=True,
              summary="ORPO: NLL + beta * odds-ratio term, no reference (Hong et al. 2024)")
register_loss("sft", "reference_free:sft_loss", needs_reference=False, paired=True, params=(), needs_lengths=True,
              summary="NLL of the chosen completion (the RPO term when mixed)")
register_loss("kto", "kto:kto_loss", needs_reference=True, paired=False,
              params=("beta", "desirable_weight", "undesirable_weight"), uses=("kto_auto_weights",),
              summary="KTO on unpaired (prompt, completion, label) data (Ethayarajh et al. 2024)")
register_loss("grpo", "grpo:grpo_loss", needs_reference=True, paired=False, rollout=True,
              params=("clip_epsilon", "clip_epsilon_high", "kl_coef", "grpo_token_level"),
              summary="GRPO: clipped ratio x group advantage + k3 KL, online (Shao et al. 2024); preftune grpo")
register_loss("nll", "reference_free:nll_loss", needs_reference=False, paired=False, params=(), supervised=True,
              summary="SFT: token-mean NLL of the completion tokens of demonstrations; preftune sft")
register_loss("bt", "reward:bradley_terry_loss", needs_reference=False, paired=True, reward_model=True,
              params=("rm_margin", "rm_center_coef"),
              summary="reward model: Bradley-Terry -log sigmoid(r_c - r_r - margin) + centering; preftune train-rm")
