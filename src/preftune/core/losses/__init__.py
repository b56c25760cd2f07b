"""The loss registry: the single source of truth for loss names and their properties.

Each loss has a kind (kinds.py: pairs, unpaired, demonstrations, rollouts, reward model) that
decides its data, its forward step, its metrics and the command that trains it; besides that, a
spec says whether the loss reads a reference (`needs_reference`), which settings it takes
(`params`), whether it receives completion lengths, which per-pair tensors its forward computes
for it alone (`inputs`: LD-DPO's tails, WPO's weights) and what loop state it keeps (`state`:
bco_pair's running baseline). The training loop asks the spec and its kind and never tests a loss
by name. Config validation, `--help`, error messages and the contract
tests are all generated from `LOSSES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .kinds import DEMONSTRATIONS, KINDS, PAIRS, POLICY_GRADIENT, REWARD_MODEL, ROLLOUTS, UNPAIRED, Kind
from .types import LossOutput, SupervisedLossOutput, UnpairedLossOutput

_LAZY = {"RolloutLossOutput": "grpo", "group_advantages": "grpo"}


def __getattr__(name: str):
    """PEP 562: the GRPO helpers re-exported here load their module (and torch) on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOSSES", "ALIASES", "INPUTS", "LossSpec", "Kind", "KINDS", "setting", "range_problem", "LossOutput",
           "UnpairedLossOutput", "SupervisedLossOutput", "RolloutLossOutput", "register_loss", "build_loss",
           "group_advantages"]

# What the pairs forward (core/step.py) computes only for the losses that name it in `inputs`, from
# the same forward's per-token log-probs (core/logprobs.pair_logps), and the keywords the loss
# function receives it under, chosen then rejected (policy, then reference, for the tails).
INPUTS = {"tail_logps": ("policy_chosen_tail_logps", "policy_rejected_tail_logps", "reference_chosen_tail_logps",
                         "reference_rejected_tail_logps"),
          "wpo_weights": ("chosen_weights", "rejected_weights")}


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
    settings: type | None = None  # its settings dataclass (config.LossConfig is generated from them)
    estimator: str = ""    # policy-gradient losses: how scored samples become advantages (ppo.ESTIMATORS)
    inputs: tuple = ()     # names from INPUTS: per-pair tensors its forward computes for it alone
    state: str = ""        # "module:Class" of the loop state it keeps (state.py); saved in every checkpoint

    @property
    def input_keys(self) -> tuple:
        """The keywords its `inputs` arrive under."""
        return tuple(k for name in self.inputs for k in INPUTS[name])

    def new_state(self):
        """A fresh loop state (None for a loss that keeps none)."""
        if not self.state:
            return None
        module, _, cls = self.state.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()

    @property
    def fn(self) -> Callable:
        """The loss function. The registry names its module instead of importing it, so that what only
        reads the registry (config validation, `preftune --help`) does not import torch (1.2 s)."""
        if callable(self.impl):
            return self.impl
        module, _, func = self.impl.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)


def setting(default, help: str, *, lo: float | None = None, hi: float | None = None,  # noqa: A002
            lo_open: bool = False, hi_open: bool = False, source: bool = False, choices: tuple[str, ...] = ()):
    """One field of a loss's settings dataclass: its default, a help line, its range (checked when
    a config loads) and `source=True` for a setting the batch source reads instead of the loss
    function (KTO's kto_auto_weights), the way PEFT's tuners declare their config classes.
    A string setting names its allowed values in `choices` instead of a range."""
    bounds = (lo, hi, lo_open, hi_open) if lo is not None or hi is not None else None
    if choices:
        bounds = tuple(choices)  # all strings: range_problem reads it as a set of names
    return field(default=default, metadata={"help": help, "bounds": bounds, "source": source})


def range_problem(value, bounds: tuple | None) -> str | None:
    """What is wrong with `value` for a setting's range (or its choices), or None (NaN is outside
    every range)."""
    if bounds is None:
        return None
    if all(isinstance(b, str) for b in bounds):
        return None if value in bounds else f"must be one of {', '.join(bounds)}"
    lo, hi, lo_open, hi_open = bounds
    above = lo is None or (value > lo if lo_open else value >= lo)
    below = hi is None or (value < hi if hi_open else value <= hi)
    if above and below:
        return None
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {lo:g}"
    return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


LOSSES: dict[str, LossSpec] = {}
# other names users know a loss by; resolved in config (aot_pair: TRL's earlier name for aot_unpaired)
ALIASES: dict[str, str] = {"dpo": "sigmoid", "aot_pair": "aot_unpaired"}


def register_loss(name: str, fn: Callable | str, *, kind: Kind, needs_reference: bool, summary: str,
                  settings: type | None = None, beta: bool = True, needs_lengths: bool = False,
                  estimator: str = "", inputs: tuple = (), state: str = "") -> LossSpec:
    """Add a loss of a registered kind; a second registration of the same name is an error. The
    loss function receives `beta` (unless beta=False) and its `settings` fields as keywords, except
    those marked source=True, which its batch source reads. `estimator`: a policy-gradient loss's
    advantage estimator (core/losses/ppo.ESTIMATORS), which its batch source runs on each batch of samples.
    `inputs`: names from INPUTS, computed by the pairs forward for this loss only; `state`: the
    "module:Class" of the loop state it keeps (the pairs forward updates it on training steps)."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    if KINDS.get(kind.name) is not kind:
        raise ValueError(f"loss {name!r}: {kind.name!r} is not a registered kind ({', '.join(KINDS)})")
    if (inputs or state) and kind is not PAIRS:
        raise ValueError(f"loss {name!r}: inputs and state are computed by the pairs forward only")
    if unknown := [i for i in inputs if i not in INPUTS]:
        raise ValueError(f"loss {name!r}: unknown inputs {unknown}; known: {', '.join(INPUTS)}")
    own = fields(settings) if settings is not None else ()
    params = (("beta",) if beta else ()) + tuple(f.name for f in own if not f.metadata["source"])
    uses = tuple(f.name for f in own if f.metadata["source"])
    LOSSES[name] = spec = LossSpec(name, fn, kind, needs_reference, params, needs_lengths, summary, uses, settings,
                                   estimator, tuple(inputs), state)
    return spec


def build_loss(name: str, mix: list | None = None) -> LossSpec:
    """The spec for `name`, or for a weighted sum of paired losses: mix = [[name, weight], ...].

    A mixture's rewards (for logging) are those of its first term; it needs a reference,
    lengths or a forward input if any term does. Mixing paired with unpaired losses is refused,
    and so is a term that keeps loop state (its state would be one per term, not per run).
    """
    if not mix:
        return LOSSES[ALIASES.get(name, name)]
    terms = [(LOSSES[n], float(w)) for n, w in mix]
    if not all(spec.kind.mixable for spec, _ in terms):
        raise ValueError(f"only losses of a mixable kind can be mixed ({', '.join(k for k, v in KINDS.items() if v.mixable)})")
    if stateful := [spec.name for spec, _ in terms if spec.state]:
        raise ValueError(f"{stateful[0]!r} keeps loop state and cannot be mixed")
    params = tuple(dict.fromkeys(p for spec, _ in terms for p in spec.params))
    needs_lengths = any(spec.needs_lengths for spec, _ in terms)
    inputs = tuple(dict.fromkeys(i for spec, _ in terms for i in spec.inputs))

    def mixture(pc, pr, rc, rr, **kwargs) -> LossOutput:
        outs = []
        for spec, _ in terms:
            keys = spec.params + (("chosen_lengths", "rejected_lengths") if spec.needs_lengths else ()) + spec.input_keys
            outs.append(spec.fn(pc, pr, rc, rr, **{k: kwargs[k] for k in keys}))
        losses = sum(w * o.losses for (_, w), o in zip(terms, outs))
        metrics = {f"loss/{spec.name}": o.losses.detach() for (spec, _), o in zip(terms, outs)}
        return LossOutput(losses, outs[0].chosen_rewards, outs[0].rejected_rewards, {**outs[0].metrics, **metrics})

    label = "+".join(f"{w:g}*{spec.name}" for spec, w in terms)
    return LossSpec(label, mixture, PAIRS, any(s.needs_reference for s, _ in terms), params, needs_lengths,
                    f"mixture {label}", inputs=inputs)


# ---- the losses, each with its settings next to it ----

register_loss("sigmoid", "dpo:sigmoid_dpo_loss", kind=PAIRS, needs_reference=True,
              summary="DPO: -log sigmoid(beta * Delta) (Rafailov et al. 2023)")


@dataclass(frozen=True)
class SmoothingSettings:
    label_smoothing: float = setting(0.0, "assumed label-flip rate eps, in [0, 0.5)", lo=0.0, hi=0.5, hi_open=True)


register_loss("cdpo", "dpo:cdpo_loss", kind=PAIRS, needs_reference=True, settings=SmoothingSettings,
              summary="conservative DPO with label smoothing eps (Mitchell 2023)")
register_loss("robust", "dpo:robust_dpo_loss", kind=PAIRS, needs_reference=True, settings=SmoothingSettings,
              summary="robust DPO, unbiased under label noise eps (Chowdhury et al. 2024)")
register_loss("hinge", "dpo:hinge_loss", kind=PAIRS, needs_reference=True,
              summary="SLiC/RSO hinge relu(1 - beta * Delta)")


@dataclass(frozen=True)
class IPOSettings:
    ipo_length_normalize: bool = setting(False, "divide each log-ratio by its completion length (TRL's form)")


register_loss("ipo", "dpo:ipo_loss", kind=PAIRS, needs_reference=True, settings=IPOSettings, needs_lengths=True,
              summary="IPO (h - 1/(2 beta))^2 (Azar et al. 2023)")


@dataclass(frozen=True)
class SimPOSettings:
    simpo_gamma: float = setting(0.5, "target reward margin gamma (use beta around 2 with simpo)")


register_loss("simpo", "reference_free:simpo_loss", kind=PAIRS, needs_reference=False, settings=SimPOSettings,
              needs_lengths=True, summary="SimPO, length-normalized, no reference (Meng et al. 2024)")
register_loss("orpo", "reference_free:orpo_loss", kind=PAIRS, needs_reference=False, needs_lengths=True,
              summary="ORPO: NLL + beta * odds-ratio term, no reference (Hong et al. 2024)")
register_loss("sft", "reference_free:sft_loss", kind=PAIRS, needs_reference=False, beta=False, needs_lengths=True,
              summary="NLL of the chosen completion (the RPO term when mixed)")


# ---- more DPO-family losses on log-ratios (dpo_variants.py) ----


@dataclass(frozen=True)
class EXOSettings:
    exo_epsilon: float = setting(1e-3, "labels' probability that the rejected side is preferred (EXO's label "
                                       "smoothing; must be > 0, e.g. 1e-3)", lo=0.0, hi=0.5, lo_open=True, hi_open=True)


register_loss("exo_pair", "dpo_variants:exo_pair_loss", kind=PAIRS, needs_reference=True, settings=EXOSettings,
              summary="EXO: reverse KL from the policy's pair preference to the labels' (Ji et al. 2024); "
                      "mode-seeking where DPO is mean-seeking")
register_loss("nca_pair", "dpo_variants:nca_pair_loss", kind=PAIRS, needs_reference=True,
              summary="NCA: absolute rewards per side (Chen et al. 2024); when DPO lowers the chosen "
                      "likelihood along with the rejected")
register_loss("sppo_hard", "dpo_variants:sppo_hard_loss", kind=PAIRS, needs_reference=True,
              summary="SPPO with hard win probabilities: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 (Wu et al. 2024); "
                      "for self-play rounds against the previous policy")
register_loss("aot", "dpo_variants:aot_loss", kind=PAIRS, needs_reference=True, settings=SmoothingSettings,
              summary="AOT paired: sorted policy margins dominate the reference's over the micro-batch "
                      "(Melnyk et al. 2024); for large batches")
register_loss("aot_unpaired", "dpo_variants:aot_unpaired_loss", kind=PAIRS, needs_reference=True,
              settings=SmoothingSettings,
              summary="AOT unpaired: sorted chosen log-ratios dominate sorted rejected ones (Melnyk et al. 2024); "
                      "when chosen and rejected are not true pairs")
register_loss("apo_zero", "dpo_variants:apo_zero_loss", kind=PAIRS, needs_reference=True,
              summary="APO-zero: raise chosen, lower rejected (D'Oosterlinck et al. 2024); when the chosen answers "
                      "are better than the model's own")
register_loss("apo_down", "dpo_variants:apo_down_loss", kind=PAIRS, needs_reference=True,
              summary="APO-down: lower both, rejected more (D'Oosterlinck et al. 2024); when the model already "
                      "writes better than the chosen answers")


@dataclass(frozen=True)
class DiscoPOPSettings:
    discopop_tau: float = setting(0.05, "temperature of the logistic/exponential blend, in (0, 1] (the paper's 0.05)",
                                  lo=0.0, hi=1.0, lo_open=True)


register_loss("discopop", "dpo_variants:discopop_loss", kind=PAIRS, needs_reference=True, settings=DiscoPOPSettings,
              summary="DiscoPOP: a discovered blend of logistic and exponential losses (Lu et al. 2024); "
                      "a drop-in for DPO")


@dataclass(frozen=True)
class FDivergenceSettings:
    f_divergence_type: str = setting("reverse_kl", "the divergence that keeps the policy near the reference: "
                                                   "reverse_kl (= DPO) | forward_kl | js_divergence | alpha_divergence",
                                     choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha_divergence_coef: float = setting(0.5, "alpha_divergence's alpha, in (0, 1]: -> 0 is reverse KL, 1 is "
                                                  "forward KL (the paper's alpha; TRL 1.16's code uses 1 - alpha)",
                                             lo=0.0, hi=1.0, lo_open=True)


register_loss("f_dpo", "dpo_variants:f_dpo_loss", kind=PAIRS, needs_reference=True, settings=FDivergenceSettings,
              summary="f-DPO: DPO under forward KL, Jensen-Shannon or alpha divergence (Wang et al. 2023); "
                      "for more diverse outputs than reverse KL gives")


@dataclass(frozen=True)
class DPOPSettings:
    dpop_lambda: float = setting(50.0, "weight of max(0, ref_c - pi_c), the penalty for a chosen log-prob below the "
                                       "reference's (the paper's 50; 0 = DPO)", lo=0.0)


register_loss("dpop", "dpo_variants:dpop_loss", kind=PAIRS, needs_reference=True, settings=DPOPSettings,
              summary="DPO-Positive: DPO that may not lower the chosen likelihood below the reference (Pal et al. "
                      "2024); for pairs that differ in a few tokens (math, reasoning)")


@dataclass(frozen=True)
class LDSettings:
    ld_alpha: float = setting(0.5, "weight of each completion's tokens past the length of the shorter one of its "
                                   "pair, in [0, 1] (1 = DPO, 0 = only the shared length counts; the paper tunes "
                                   "it per model)", lo=0.0, hi=1.0)


register_loss("ld_dpo", "dpo_variants:ld_dpo_loss", kind=PAIRS, needs_reference=True, settings=LDSettings,
              inputs=("tail_logps",),
              summary="LD-DPO: DPO with the longer completion's tokens past the shorter one's length weighted "
                      "by alpha (Liu et al. 2024); when DPO makes the answers longer and longer")
register_loss("wpo", "dpo_variants:wpo_loss", kind=PAIRS, needs_reference=True, inputs=("wpo_weights",),
              summary="WPO: DPO with each pair weighted by the policy's length-normalised probability of its two "
                      "completions (Zhou et al. 2024); for off-policy pairs written by other models")
register_loss("bco_pair", "dpo_variants:bco_pair_loss", kind=PAIRS, needs_reference=True,
              state="state:RunningRewardMean",
              summary="BCO on pairs: chosen and rejected each classified as good or bad around a running reward "
                      "baseline (Jung et al. 2024); the paired form of a loss built for thumbs-up/down data, on par "
                      "with DPO in the paper")


# ---- more reference-free losses (reference_free.py) ----


@dataclass(frozen=True)
class CPOSettings:
    cpo_alpha: float = setting(1.0, "weight of the chosen completion's per-token NLL (the paper's 1; 0 = none)", lo=0.0)


register_loss("cpo", "reference_free:cpo_loss", kind=PAIRS, needs_reference=False, settings=CPOSettings,
              needs_lengths=True,
              summary="CPO: -log sigmoid(beta (pi_c - pi_r)) + NLL, no reference (Xu et al. 2024); when a "
                      "reference does not fit, or for translation")


@dataclass(frozen=True)
class SLiCSettings:
    slic_delta: float = setting(1.0, "margin delta (nats) by which the chosen sequence log-likelihood should exceed "
                                     "the rejected's", lo=0.0)
    slic_lambda: float = setting(0.1, "weight of the chosen completion's summed NLL (the regularizer)", lo=0.0)


register_loss("slic_hf", "reference_free:slic_hf_loss", kind=PAIRS, needs_reference=False, settings=SLiCSettings,
              beta=False,
              summary="SLiC-HF: hinge on sequence log-likelihoods + NLL of chosen, no reference (Zhao et al. 2023); "
                      "a cheap, reference-free calibration")


@dataclass(frozen=True)
class KTOSettings:
    desirable_weight: float = setting(1.0, "weight of desirable examples", lo=0.0, lo_open=True)
    undesirable_weight: float = setting(1.0, "weight of undesirable examples", lo=0.0, lo_open=True)
    kto_auto_weights: bool = setting(False, "set the two weights from class counts so both classes weigh the same",
                                     source=True)


register_loss("kto", "kto:kto_loss", kind=UNPAIRED, needs_reference=True, settings=KTOSettings,
              summary="KTO on unpaired (prompt, completion, label) data (Ethayarajh et al. 2024)")


def _clip_epsilon():
    return setting(0.2, "the policy ratio is clipped to [1 - eps, 1 + eps_high]", lo=0.0, hi=1.0, lo_open=True,
                   hi_open=True)


def _clip_epsilon_high():
    return setting(0.0, "upper clip eps_high (DAPO's clip-higher); 0 = clip_epsilon", lo=0.0)


def _tis_cap():
    return setting(0.0, "truncated importance sampling, each token's policy term weighted by "
                        "min(p_trainer / p_sampler, tis_cap) (0 = off; e.g. 2)", lo=0.0)


def _kl_coef():
    return setting(0.04, "weight of the per-token k3 KL(policy || reference) penalty; 0 = no reference forward",
                   lo=0.0)


@dataclass(frozen=True)
class GroupSamplingSettings:
    """What the GRPO source (runs/online/grpo.py) does with the groups it samples, for every loss
    of the GRPO family (source=True: the source reads them, the loss function does not). DAPO's
    recipe turns on dynamic sampling; the overlong filter and punishment are off unless set."""
    dynamic_sampling: bool = setting(False, "drop groups whose rewards are all equal (advantage 0, no signal) and "
                                            "draw more prompts until online.prompts_per_step groups are kept "
                                            "(DAPO's dynamic sampling)", source=True)
    dynamic_sampling_max_draws: int = setting(8, "dynamic sampling: at most this many draws per batch of samples, "
                                                 "then train on the groups kept so far", lo=1, hi=64, source=True)
    overlong_filter: bool = setting(False, "completions cut off at online.max_new_tokens without an EOS take no "
                                           "part in the loss (DAPO's overlong filtering)", source=True)
    overlong_buffer: int = setting(0, "soft overlong punishment (DAPO): over the last this many tokens before "
                                      "online.max_new_tokens, a penalty rising linearly to overlong_penalty is "
                                      "subtracted from the reward; 0 = off", lo=0, source=True)
    overlong_penalty: float = setting(1.0, "soft overlong punishment: the penalty at online.max_new_tokens tokens",
                                      lo=0.0, source=True)


@dataclass(frozen=True)
class GRPOSettings(GroupSamplingSettings):
    clip_epsilon: float = _clip_epsilon()
    clip_epsilon_high: float = _clip_epsilon_high()
    kl_coef: float = _kl_coef()
    grpo_token_level: bool = setting(False, "average over all completion tokens of a micro-batch (DAPO) instead of "
                                            "per completion, then over completions (the paper's)")
    tis_cap: float = _tis_cap()


register_loss("grpo", "grpo:grpo_loss", kind=ROLLOUTS, needs_reference=True, settings=GRPOSettings, beta=False,
              summary="GRPO: clipped ratio x group advantage + k3 KL, online (Shao et al. 2024); preftune grpo")


# ---- the rest of the GRPO family (grpo_variants.py); each trains with preftune grpo ----


@dataclass(frozen=True)
class ClippedRolloutSettings(GroupSamplingSettings):
    clip_epsilon: float = _clip_epsilon()
    clip_epsilon_high: float = _clip_epsilon_high()
    kl_coef: float = _kl_coef()
    tis_cap: float = _tis_cap()


register_loss("dapo", "grpo_variants:dapo_loss", kind=ROLLOUTS, needs_reference=True,
              settings=ClippedRolloutSettings, beta=False,
              summary="DAPO: clip-higher (0.2 / 0.28), token-level mean, no KL, dynamic sampling (Yu et al. 2025); "
                      "for long reasoning RL where GRPO's entropy collapses or batches go all-right/all-wrong")
register_loss("bnpo", "grpo_variants:bnpo_loss", kind=ROLLOUTS, needs_reference=True,
              settings=ClippedRolloutSettings, beta=False,
              summary="TRL's bnpo: GRPO averaged over the micro-batch's tokens (not the BNPO paper's Beta "
                      "normalisation); when porting a TRL run that used it")


@dataclass(frozen=True)
class DrGRPOSettings(ClippedRolloutSettings):
    dr_grpo_tokens: int = setting(0, "Dr. GRPO's constant divisor of each completion's token sum (the generation "
                                     "budget); 0 = online.max_new_tokens", lo=0)


register_loss("dr_grpo", "grpo_variants:dr_grpo_loss", kind=ROLLOUTS, needs_reference=True, settings=DrGRPOSettings,
              beta=False,
              summary="Dr. GRPO: token sums over a constant, no length bias (Liu et al. 2025); with "
                      "online.scale_rewards=false, when GRPO's completions grow long on wrong answers")
register_loss("gspo", "grpo_variants:gspo_loss", kind=ROLLOUTS, needs_reference=True,
              settings=ClippedRolloutSettings, beta=False,
              summary="GSPO: one length-normalised ratio per completion, clipped whole (Zheng et al. 2025); for "
                      "MoE models or long completions where token ratios are noisy")
register_loss("luspo", "grpo_variants:luspo_loss", kind=ROLLOUTS, needs_reference=True,
              settings=ClippedRolloutSettings, beta=False,
              summary="LUSPO: GSPO with each completion's term scaled by its length (Liu et al. 2026); when GSPO "
                      "shortens the completions")


@dataclass(frozen=True)
class CISPOSettings(GroupSamplingSettings):
    cispo_weight_min: float = setting(0.0, "lower clip of the detached importance weight (0 = none, the paper's)",
                                      lo=0.0)
    cispo_weight_max: float = setting(5.0, "upper clip of the detached importance weight (MiniMax-M1's "
                                           "1 + eps_high; TRL's epsilon_high for cispo)", lo=1.0)
    kl_coef: float = _kl_coef()
    tis_cap: float = _tis_cap()


register_loss("cispo", "grpo_variants:cispo_loss", kind=ROLLOUTS, needs_reference=True, settings=CISPOSettings,
              beta=False,
              summary="CISPO: clipped, detached IS weight x A x log p, every token keeps its gradient (MiniMax "
                      "2025); for several passes over each batch of samples (online.grpo_iterations > 1)")


@dataclass(frozen=True)
class SAPOSettings(GroupSamplingSettings):
    sapo_temperature_pos: float = setting(1.0, "gate temperature for tokens with a positive advantage", lo=0.0,
                                          lo_open=True)
    sapo_temperature_neg: float = setting(1.05, "gate temperature for the others (the paper's: higher, faster "
                                                "decay)", lo=0.0, lo_open=True)
    kl_coef: float = _kl_coef()
    tis_cap: float = _tis_cap()


register_loss("sapo", "grpo_variants:sapo_loss", kind=ROLLOUTS, needs_reference=True, settings=SAPOSettings,
              beta=False,
              summary="SAPO: a smooth sigmoid gate on the token ratio instead of the hard clip (Gao et al. 2025); "
                      "when a hard clip throws away too many tokens")


@dataclass(frozen=True)
class PolicyGradientSettings:
    clip_epsilon: float = _clip_epsilon()
    clip_epsilon_high: float = _clip_epsilon_high()
    tis_cap: float = _tis_cap()


@dataclass(frozen=True)
class PPOSettings(PolicyGradientSettings):
    vf_coef: float = setting(0.1, "weight of the critic's clipped value loss", lo=0.0)
    vf_clip: float = setting(0.2, "a value prediction moves at most this far from its sampling-time value (clipped "
                                  "value loss)", lo=0.0, lo_open=True)


register_loss("ppo", "ppo:ppo_loss", kind=POLICY_GRADIENT, needs_reference=True, settings=PPOSettings, beta=False,
              estimator="gae", summary="PPO with a critic: KL in the reward, GAE, clipped policy and value losses "
                                       "(Schulman et al. 2017; Ouyang et al. 2022); preftune ppo")
register_loss("rloo", "ppo:ppo_loss", kind=POLICY_GRADIENT, needs_reference=True, settings=PolicyGradientSettings,
              beta=False, estimator="rloo", summary="RLOO: leave-one-out baseline over k samples per prompt, KL in "
                                                    "the reward, no critic (Ahmadian et al. 2024); preftune ppo")
register_loss("reinforce_pp", "ppo:ppo_loss", kind=POLICY_GRADIENT, needs_reference=True,
              settings=PolicyGradientSettings, beta=False, estimator="reinforce_pp",
              summary="REINFORCE++: per-token KL in the reward, returns normalised over the batch, no critic "
                      "(Hu 2025); preftune ppo")
register_loss("nll", "reference_free:nll_loss", kind=DEMONSTRATIONS, needs_reference=False, beta=False,
              summary="SFT: token-mean NLL of the completion tokens of demonstrations; preftune sft")


@dataclass(frozen=True)
class BradleyTerrySettings:
    rm_margin: float = setting(0.0, "required gap between chosen and rejected scores, >= 0", lo=0.0)
    rm_center_coef: float = setting(0.0, "weight of (r_c + r_r)^2, keeps scores centred at 0 (e.g. 0.01)", lo=0.0)


register_loss("bt", "reward:bradley_terry_loss", kind=REWARD_MODEL, needs_reference=False,
              settings=BradleyTerrySettings, beta=False,
              summary="reward model: Bradley-Terry -log sigmoid(r_c - r_r - margin) + centering; preftune train-rm")
