"""Overlap (`sampling.overlap`): with an external engine (a vLLM server), batch of samples s + 1 is
drawn while batch s trains. Opt-in: it makes the run one batch of samples off-policy.

The engine's `sample` is HTTP requests to another process, so a Python thread that waits on them
costs the trainer nothing (the GIL is released while a socket waits). The server generates while
the trainer runs its forward and backward passes.

The schedule. S(s) is the number of optimizer steps done before batch s trains (the source's
`_steps_before`; with GRPO's defaults S(s) = s). v_k names the weights after k optimizer steps.

    main thread                                  prefetch thread         the server holds
    draw(0): push v_S(0); sample 0; score        -                       v_S(0)
             launch(1)                           sample 1 (attempt 0)    v_S(0)
    train on batch 0                             ...
    draw(1): join(1); score; retries             -                       v_S(0)
             push v_S(1); launch(2)              sample 2 (attempt 0)    v_S(1)
    train on batch 1                             ...
    draw(2): join(2); score; retries; push v_S(2); launch(3) ...

The rules that keep it correct:

1. The engine is used by one thread at a time: the prefetch thread from launch(s) to join(s), the
   main thread otherwise. So no push lands while a request is in flight. Otherwise the server
   would answer some prompts of a batch with old weights and some with new ones.
2. The weights step k produces (v_S(k+1)) are pushed in draw(k + 1), after join(k + 1) and
   before launch(k + 2). So the push for step k comes before any request of batch k + 2, and
   batch s + 1 is always sampled from v_S(s).
3. Batch s's further draws (retries after failed scores, DAPO's dynamic sampling) run in the
   main thread before the push of v_S(s). So every sample of a batch comes from the same weights.
4. Nothing is pending on the first batch, or on the first batch after a resume. That batch is
   pushed and sampled in the main thread, on-policy.
5. No launch is made past the run's last batch (S(s + 1) >= train.max_steps).

Staleness of a sample: S(s) minus the steps of the weights that sampled it. That is
S(s) - S(s - 1) for a prefetched batch: 1 optimizer step with GRPO's defaults, the steps per
batch of samples otherwise (online.grpo_iterations, ppo.epochs x ppo.mini_batches, over
train.grad_accum). It is 0 for a batch drawn in the main thread, and sampling.sync_every > 1 adds
the steps since the window's push. It is kept per row (`staleness`) and logged per step as
`sampler/staleness_mean`. The trainer corrects the gap with the truncated-IS weight
min(p_trainer / p_sampler, loss.tis_cap) on each token. The sampler's log-probs are the stale
weights', so this one ratio covers both the engine's kernels and the staleness. With overlap on
and loss.tis_cap left at 0, the cap is OVERLAP_TIS_CAP (2). TRL corrects vLLM samples by default
with a cap of 2, and Yao et al. 2025 recommend 2. Stale samples with no correction would be a
silent bias, so 0 is not read as "off" here. Set another cap to change it.

Determinism: batch s's samples are a function of its seeds (train.seed, s, attempt; per prompt,
as without overlap) and of v_S(s-1), not of timing. So a run is reproducible given the same
server. Resume is not bit-identical. The checkpoint after step k holds v_k+1, not the older
weights the uninterrupted run sampled its next batch from. A resumed run re-requests that batch
on-policy (rule 4: staleness 0), and from then on follows the same schedule. Two resumes from one
checkpoint are identical.

Errors: the thread keeps what it raised, and `Prefetch.result` raises it again in the main thread.
That is the same one-line EngineError (exit 2) that a draw in the main thread gives. The engine's
requests have deadlines (sampling.timeout_s). The join has its own deadline as well, so a thread
stuck anyway ends the run in one line and never hangs it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ...models.vllm_engine import EngineError

__all__ = ["Overlap", "Prefetch", "OVERLAP_TIS_CAP", "join_deadline"]

OVERLAP_TIS_CAP = 2.0  # loss.tis_cap with sampling.overlap when the config leaves it at 0 (module docstring)


def join_deadline(timeout_s: float, prompts: int) -> float:
    """The longest the main thread waits for a prefetched batch. The engine sends at most 32
    prompts at once, each request bounded by `timeout_s`, after at most `timeout_s` waiting for the
    server to be ready. One `timeout_s` more is slack, not a bound anyone should reach."""
    return timeout_s * (math.ceil(max(prompts, 1) / 32) + 2)


class Prefetch:
    """Batch of samples `index`, drawn by `fetch()` in a daemon thread. The thread is a daemon so a run
    that stops (an error, diagnostics.stop_on) never waits for a request it no longer needs.
    `version`: the optimizer steps of the weights the engine held at launch."""

    def __init__(self, index: int, version: int, fetch: Callable[[], list], *, deadline_s: float, url: str):
        self.index, self.version, self.deadline_s, self.url = index, version, deadline_s, url
        self._result: list | None = None
        self._error: BaseException | None = None
        self.waited_s = 0.0  # how long `result` blocked the main thread
        self._thread = threading.Thread(target=self._run, args=(fetch,), name=f"prefetch-{index}", daemon=True)
        self._thread.start()

    def _run(self, fetch: Callable[[], list]) -> None:
        try:
            self._result = fetch()
        except BaseException as err:  # noqa: BLE001 - everything goes back to the main thread
            self._error = err

    def result(self) -> list:
        """The samples. This raises the thread's error again, or an EngineError once the deadline passes."""
        start = time.perf_counter()
        self._thread.join(self.deadline_s)
        self.waited_s = time.perf_counter() - start
        if self._thread.is_alive():
            raise EngineError(self.url, f"the prefetched batch of samples {self.index} did not come back within "
                              f"{self.deadline_s:g} s (sampling.overlap; sampling.timeout_s bounds each request)")
        if self._error is not None:
            raise self._error
        return self._result


class Overlap:
    """A source's side of the engine: the optimizer steps of the weights it holds (`pushed`) and,
    with `enabled` (sampling.overlap), the batch being prefetched. `waited_s` sums how long the
    main thread blocked on prefetches (~0 when sampling hides behind training)."""

    def __init__(self, engine, *, enabled: bool):
        self.engine, self.enabled = engine, enabled
        self.pushed, self.waited_s = 0, 0.0
        self._ahead: Prefetch | None = None

    def push(self, model, step: int) -> None:
        """The policy after `step` optimizer steps, to the engine (when its sync_every window says so)."""
        if self.engine.sync(model, step=step):
            self.pushed = step

    def launch(self, index: int, fetch: Callable[[], list], prompts: int) -> None:
        """Start drawing batch `index` in a thread, from the weights pushed so far."""
        deadline = join_deadline(self.engine.timeout_s, prompts)
        self._ahead = Prefetch(index, self.pushed, fetch, deadline_s=deadline,
                               url=getattr(self.engine, "url", "") or "(not started)")

    def collect(self, index: int) -> Prefetch | None:
        """Batch `index`'s prefetch, joined (its error raised here), or None when none was launched
        (the first batch, the first after a resume)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.index != index:
            return None
        ahead.result()
        self.waited_s += ahead.waited_s
        return ahead
