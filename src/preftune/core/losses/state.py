"""Loop state a loss keeps across micro-batches: the pairs forward (core/step.py) updates it on
training steps, the loop saves it in every checkpoint (plain numbers in state.json) and restores it
on resume, so a resumed run equals an uninterrupted one.

A state object has `observe(...)` (one training micro-batch), `inputs(device)` (the keywords the
loss function receives from it), `state_dict()` and `load_state_dict(d)`. The loss function itself
stays pure: it takes the state's value as a named tensor.
"""

from __future__ import annotations

import torch

__all__ = ["RunningRewardMean"]


class RunningRewardMean:
    """bco_pair's reward baseline delta: the running mean of each training micro-batch's mean
    implicit reward, m_k = mean(beta c_1..B, beta r_1..B) over the micro-batch's 2B completions
    (under several processes, the mean of the processes' m_k, as one update of weight P):

        delta_n = delta_{n-1} + (m_n - delta_{n-1}) * w_n / (W_{n-1} + w_n),  W_n = W_{n-1} + w_n,

    i.e. delta_n = the mean of every m_k so far, the current micro-batch included (it is observed
    before the loss is computed). delta_0 = 0. This is the running mean of TRL's bco_pair up to
    0.2x (RunningMoments updated with the micro-batch's mean reward); TRL 1.16 dropped the baseline.
    Kept in float64 (Python floats), so its JSON copy in a checkpoint restores it bit for bit.
    """

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def observe(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                *, beta: float) -> None:
        rewards = beta * torch.cat([policy_chosen_logps - reference_chosen_logps,
                                    policy_rejected_logps - reference_rejected_logps]).detach()   # (2B,)
        value, weight = rewards.float().mean(), 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            weight = torch.distributed.get_world_size()
            total = value.reshape(1).clone()
            torch.distributed.all_reduce(total)  # every process observes the same step: one collective
            value = total[0] / weight
        self.count += weight
        self.mean += (float(value) - self.mean) * weight / self.count

    def inputs(self, device) -> dict:
        return {"reward_baseline": torch.tensor(self.mean, dtype=torch.float32, device=device)}

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
