"""The kinds of loss: what a loss trains on, and everything that follows from that.

A loss's kind decides what its data are, how one micro-batch becomes per-example losses (its
forward), what one optimizer step logs (its metrics), the progress bar's field, whether its packed
rows are measured or it stays padded (its layout), how its held-out pairs are scored, which
command trains and resumes it, and whether it mixes with others. The training loop, evaluation,
the data path and the CLI ask the kind; none of them tests a loss by name or by a flag.

A new loss of an existing kind registers with that kind and touches nothing here. A new kind
(say, PPO's critic-based RL) is one more `Kind` below plus the functions it names: see
docs/extending.md for the files, in order.

The hooks are "module:function" names, imported on first use (like `LossSpec.impl`), so that what
only reads the registry (config validation, `preftune --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Kind", "KINDS", "PAIRS", "UNPAIRED", "DEMONSTRATIONS", "ROLLOUTS", "POLICY_GRADIENT", "REWARD_MODEL"]


def _resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(f"preftune.{module}"), attr)


@dataclass(frozen=True)
class Kind:
    name: str
    data: str           # what a training record is: "pairs", "unpaired" (prompt, completion, label),
                        # "demonstrations" (prompt, completion), "prompts" (sampled during the run)
    example: str        # one example, as messages and the progress line name it ("pair", "completion", ...)
    forward_hook: str   # "module:function" under preftune: (model, reference, spec, batch, kwargs, device, bf16)
                        # -> (per-example losses, detached per-example parts)
    metrics_hook: str   # "module:function" under preftune: (gathered parts) -> one step's logged row
    progress: tuple     # (label, metric key) shown beside the loss on the progress bar
    runner: str         # "module:function" under preftune that trains (and resumes) a run of this kind
    command: str        # the verb that runs `runner`
    layout: str         # "measured": packed rows used where measured exact on the model; "padded": always
    model: str          # "causal_lm", or "score_head" (a sequence-classification head on the model)
    pair_scorer: str    # the loss that scores held-out pairs: "" = the loss itself
    samples: bool       # the trained model can generate (probes, sampled KL)
    margins: str        # "beta": implicit-reward margins, scaled by loss.beta; "scores": score gaps
    mixable: bool       # may be a term of loss.mix

    @property
    def forward(self) -> Callable:
        return _resolve(self.forward_hook)

    @property
    def metrics(self) -> Callable:
        return _resolve(self.metrics_hook)

    @property
    def run(self) -> Callable:
        return _resolve(self.runner)


PAIRS = Kind("pairs", data="pairs", example="pair", forward_hook="core.step:pairs_forward",
             metrics_hook="core.diagnostics:pair_metrics", progress=("margin", "rewards/margins"),
             runner="training.train:train", command="train", layout="measured", model="causal_lm",
             pair_scorer="", samples=True, margins="beta", mixable=True)
UNPAIRED = Kind("unpaired", data="unpaired", example="example", forward_hook="core.step:unpaired_forward",
                metrics_hook="core.diagnostics:unpaired_metrics", progress=("margin", "rewards/margins"),
                runner="training.train:train", command="train", layout="measured", model="causal_lm",
                pair_scorer="sigmoid", samples=True, margins="beta", mixable=False)
DEMONSTRATIONS = Kind("demonstrations", data="demonstrations", example="example",
                      forward_hook="core.step:demonstrations_forward",
                      metrics_hook="core.diagnostics:demonstration_metrics", progress=("nll", "nll/token"),
                      runner="runs.sft:run_sft", command="sft", layout="measured", model="causal_lm",
                      pair_scorer="sigmoid", samples=True, margins="beta", mixable=False)
ROLLOUTS = Kind("rollouts", data="prompts", example="completion", forward_hook="core.step:rollout_forward",
                metrics_hook="core.diagnostics:rollout_metrics", progress=("reward", "reward/mean"),
                runner="runs.online.grpo:run_grpo", command="grpo", layout="measured", model="causal_lm",
                pair_scorer="sigmoid", samples=True, margins="beta", mixable=False)
# PPO (with a critic), RLOO, REINFORCE++: samples with per-token advantages computed once per batch of
# samples (the KL penalty folded into the reward), then epochs of mini-batches on the clipped loss
POLICY_GRADIENT = Kind("policy_gradient", data="prompts", example="completion",
                       forward_hook="core.step:policy_gradient_forward",
                       metrics_hook="core.diagnostics:policy_gradient_metrics", progress=("reward", "reward/mean"),
                       runner="runs.online.ppo:run_ppo", command="ppo", layout="padded", model="causal_lm",
                       pair_scorer="sigmoid", samples=True, margins="beta", mixable=False)
REWARD_MODEL = Kind("reward_model", data="pairs", example="pair", forward_hook="core.step:score_forward",
                    metrics_hook="core.diagnostics:score_metrics", progress=("margin", "rewards/margins"),
                    runner="runs.rm:run_train_rm", command="train-rm", layout="padded", model="score_head",
                    pair_scorer="", samples=False, margins="scores", mixable=False)

KINDS: dict[str, Kind] = {k.name: k for k in (PAIRS, UNPAIRED, DEMONSTRATIONS, ROLLOUTS, POLICY_GRADIENT,
                                                       REWARD_MODEL)}
