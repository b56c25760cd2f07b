"""GRPO as a batch source of train()'s one loop (Shao et al. 2024, arXiv 2402.03300).

Micro-batch i draws `online.prompts_per_step` prompts with a generator seeded by (train.seed, i,
process), samples a group of G = `online.samples_per_prompt` completions per prompt from the
policy as it is at that moment (seed (train.seed, i, attempt)), scores every completion with the
reward source, and turns each group's rewards into advantages (losses/grpo.group_advantages).
The rows are the sampled token ids themselves (never re-tokenized text); where exact on the model
(the layout check every source runs) a group is packed as one block [prompt, c_1, ..., c_G] with
the prompt processed once, else right-padded rows; the loss (losses/grpo.grpo_loss) runs on their
per-token log-probs. One optimisation pass per batch of
samples: the sampling policy is the current one, so the policy ratio is 1 at the gradient.

Like the online DPO source, micro-batch i depends only on its position and the weights, so a
resumed run is bit-identical to an uninterrupted one. That does not hold with `sampling.overlap`,
which draws batch s + 1 in a thread while batch s trains (prefetch.py gives the schedule and says
why). A group with a reward that failed (NaN: a judge that did not answer, a prompt the verifier
does not know) is dropped and counted; when a draw keeps no group, the next attempt draws other
prompts, and after MAX_ATTEMPTS the run stops with one line. Groups whose completions all scored the same keep advantage 0 (no policy-gradient
signal; `groups/zero_variance` is their share).

`evaluate` (the run's held-out measure, summary["eval"]): on `online.eval_prompts_path`, policy
and reference each sample `online.eval_samples` completions per prompt with the same seed; their
mean rewards (for a 0/1 verifier: accuracy), the gain with a 95% bootstrap interval over prompts,
KL(policy || reference) on the policy's samples and sample lengths.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...core.logprobs import completion_token_logps
from ...core.losses import LOSSES, LossSpec, build_loss, group_advantages
from ...core.losses.grpo import soft_overlong_penalty
from ...data import render
from ...data.batches import exact_layout
from ...data.collate import collate_packed, collate_sequences
from ...data.layouts import Layout
from ...data.records import PreferenceRecord
from ...data.tokenize import tokenize_records
from ...models.generate import decode_completions, sample_completions
from ...models.vllm_engine import engine_for
from ...training.evaluate import heldout_reward
from ...training.train import RunResult, train
from ...utils.devices import place
from ...utils.errors import ConfigError
from ...utils.safeio import atomic_path
from .prefetch import OVERLAP_TIS_CAP, Overlap
from .rollouts import load_prompts, reward_from_config

__all__ = ["GRPOSource", "MAX_ATTEMPTS", "run_grpo", "write_samples", "read_samples"]


def write_samples(path: Path, rows: list, tensors: dict) -> None:
    """A batch of samples kept for the passes that follow it: its (prompt_ids, completion_ids)
    rows and the tensors computed from them, one safetensors file written whole or not at all."""
    flat = {"prompt_ids": torch.tensor([t for p, _ in rows for t in p], dtype=torch.int64),
            "prompt_lengths": torch.tensor([len(p) for p, _ in rows], dtype=torch.int64),
            "completion_ids": torch.tensor([t for _, c in rows for t in c], dtype=torch.int64),
            "completion_lengths": torch.tensor([len(c) for _, c in rows], dtype=torch.int64),
            **{k: v.cpu().contiguous() for k, v in tensors.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp))


def read_samples(path: Path, hint: str = "") -> tuple[list, torch.Tensor, dict]:
    """`write_samples`'s file: (rows, completion lengths, the other tensors); a missing file is one
    line naming it (`hint` says what keeps them)."""
    if not path.is_file():
        raise ConfigError(str(path), "resume", "the samples this pass trains on are missing; resume from an "
                          f"earlier checkpoint{hint}")
    t = load_file(str(path))
    prompts = torch.split(t.pop("prompt_ids"), t.pop("prompt_lengths").tolist())
    lengths = t.pop("completion_lengths")
    completions = torch.split(t.pop("completion_ids"), lengths.tolist())
    return [(p.tolist(), c.tolist()) for p, c in zip(prompts, completions)], lengths, t

MAX_ATTEMPTS = 8


class GRPOSource:
    """Groups of completions sampled from the current policy, scored, with group advantages."""

    feeds = ("rollouts",)

    def __init__(self, cfg, spec: LossSpec, prompts: list, reward, eval_prompts: list | None = None, engine=None):
        if spec.kind.name not in self.feeds:
            command = LOSSES[next(n for n, s in LOSSES.items() if s.kind.name in self.feeds)].kind.command
            raise ConfigError("defaults", "loss.name", f"preftune {command} trains a {self.feeds[0].replace('_', '-')} "
                              f"loss ({', '.join(n for n, s in LOSSES.items() if s.kind.name in self.feeds)}), "
                              f"not {spec.name!r}")
        if not cfg.train.max_steps:
            raise ConfigError("defaults", "train.max_steps", f"{spec.kind.command} needs a number of steps (> 0)")
        self.cfg, self.spec, self.prompts, self.reward = cfg, spec, prompts, reward
        self.eval_prompts = eval_prompts
        self.engine = engine  # models/vllm_engine.VLLMEngine, or None: the built-in sampler
        digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
        self.identity = {"online.prompts_sha256": digest, "online.reward_name": reward.name,
                         **{f"online.{k}": v for k, v in vars(cfg.online).items()
                            if k not in {"eval_prompts_path", "eval_samples", "rounds", "refresh_reference"}}}
        self.stats = {"source": "grpo", "prompts": len(prompts), "reward": reward.name,
                      "eval_prompts": len(eval_prompts) if eval_prompts else 0}
        self.loss_adjustments: dict = self._budget(cfg, spec)
        self.eval_pairs, self.eval_collate = None, None
        self._counts: list[dict] = []
        self._held, self._rows = None, []  # (sample index, batch) reused across the mu passes
        self.overlap = Overlap(engine, enabled=cfg.sampling.overlap)  # the engine's weights; the prefetch
        if cfg.sampling.overlap:
            self._overlap_settings(cfg, spec)

    def _overlap_settings(self, cfg, spec: LossSpec) -> None:
        """sampling.overlap: stale samples are corrected by the truncated-IS weight, capped at
        loss.tis_cap, or OVERLAP_TIS_CAP when it is left at 0 (prefetch.py says why)."""
        if self.engine is None:
            raise ConfigError("defaults", "sampling.overlap", "needs sampling.engine=vllm")
        if "tis_cap" not in spec.params:
            raise ConfigError("defaults", "sampling.overlap", f"{spec.name!r} has no loss.tis_cap to correct "
                              "samples from older weights")
        cap = cfg.loss.tis_cap or OVERLAP_TIS_CAP
        self.loss_adjustments["tis_cap"] = cap
        self.stats["overlap"] = {"tis_cap": cap}

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        keep = self.cfg.data.max_prompt_length  # longer prompts keep their last tokens, as pairs do
        self.prompt_ids = [render.prompt_ids(tokenizer, p)[-keep:] for p in self.prompts]
        self.eval_ids = [render.prompt_ids(tokenizer, p)[-keep:] for p in self.eval_prompts or []]

    def describe(self) -> str:
        o = self.cfg.online
        return (f"grpo, {len(self.prompts)} prompts, {o.prompts_per_step} per micro-batch x "
                f"{o.samples_per_prompt} samples, reward {self.reward.name}{self._overlap_note()}")

    def _overlap_note(self) -> str:
        if "overlap" not in self.stats:
            return ""
        return f", overlap (one batch of samples ahead, tis_cap {self.stats['overlap']['tis_cap']:g})"

    def layout(self, cfg, model, model_dir: str):
        """Packed with prefix sharing where that is exact on this model (checked like every
        source, on stand-in pairs of the first prompts): a group is one block [prompt, c_1, ...,
        c_G], its prompt processed once for G completions. Else right-padded rows."""
        records = [PreferenceRecord(p, " 12", " 7 + 5 = 12", "layout check", i + 1)
                   for i, p in enumerate(self.prompts[: max(2, min(len(self.prompts), 4))])]
        examples, _ = tokenize_records(records, self.tokenizer, max_length=cfg.data.max_length,
                                       max_prompt_length=cfg.data.max_prompt_length, drop_overlong=True,
                                       allow_degenerate=True)
        self.chosen, info = exact_layout(cfg, self.spec.kind, model, examples, self.tokenizer.pad_token_id,
                                         model_dir) \
            if examples else (Layout("padded", False), {"layout": "padded", "prefix_sharing": False})
        return self.chosen, info

    def _collate(self, rows: list, g: int) -> dict:
        """Rows (prompt_ids, completion_ids), G per group, as one batch in the checked layout;
        sequence k*G + j is completion j of group k in both."""
        d = self.chosen
        if d.layout == "packed":
            groups = [(rows[k][0], [(k + j, rows[k + j][1]) for j in range(g)]) for k in range(0, len(rows), g)]
            return collate_packed(groups, len(rows), d.prefix_sharing)
        return collate_sequences([p for p, _ in rows], [c for _, c in rows], self.tokenizer.pad_token_id)

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> None:
        self.model, self.reference, self.rank = model, reference, accelerator.process_index
        if self.engine is not None:  # the server starts while the loop sets up; the first draw waits for it
            self.engine.start(Path(cfg.run.output_dir) / "vllm")
        return None  # unbounded: train.max_steps is the length of the run

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        index = skip
        while True:
            yield self._micro_batch(index)
            index += 1

    def _micro_batch(self, index: int) -> dict:
        """Micro-batch `index` is pass `index % mu` over batch of samples `index // mu`."""
        mu = self.cfg.online.grpo_iterations
        sample, step_in = divmod(index, mu)
        if mu == 1:
            return self._sample(sample)
        if self._held is not None and self._held[0] == sample:
            return self._held[1]
        if step_in:  # resumed between two passes over one batch of samples: the saved samples
            batch = place(self._read_rollout(sample), self.model)
        else:
            batch = self._sample(sample)
            was_training = self.model.training
            self.model.eval()  # the sampling policy's log-probs, without dropout: what later passes clip against
            with torch.no_grad():
                batch["old_logps"] = completion_token_logps(self.model, batch)[0]
            self.model.train(was_training)
            self._write_rollout(sample, batch)
        self._held = (sample, batch)
        return batch

    def _rollout_path(self, sample: int):
        return Path(self.cfg.run.output_dir) / "rollouts" / f"sample-{sample:08d}-rank{self.rank}.safetensors"

    def _write_rollout(self, sample: int, batch: dict) -> None:
        """What later passes over this batch of samples need, should the run be resumed between
        them: the rows' tokens, rewards, old log-probs."""
        write_samples(self._rollout_path(sample), self._rows, {k: batch[k] for k in
                                                               ("rewards", "old_logps", "sampler_logps", "staleness")
                                                               if k in batch})

    def _read_rollout(self, sample: int) -> dict:
        rows, _, t = read_samples(self._rollout_path(sample), " (online.grpo_iterations > 1 keeps them in rollouts/)")
        return self._batch(rows, t["rewards"], old_logps=t["old_logps"], sampler_logps=t.get("sampler_logps"),
                           staleness=t.get("staleness"))

    def _batch(self, rows: list, rewards: torch.Tensor, old_logps: torch.Tensor | None = None,
               sampler_logps: torch.Tensor | None = None, staleness: torch.Tensor | None = None) -> dict:
        g, o = self.cfg.online.samples_per_prompt, self.cfg.online
        self._rows = rows
        batch = self._collate(rows, g)
        batch["rewards"] = rewards
        batch["advantages"] = group_advantages(rewards, g, scale=o.scale_rewards)
        batch["group_std"] = rewards.view(-1, g).std(dim=1).repeat_interleave(g)
        if self.cfg.loss.overlong_filter:  # DAPO: truncated completions take no part in the loss
            batch["completion_keep"] = 1.0 - self._truncated(rows)
        if old_logps is not None:
            batch["old_logps"] = old_logps
        if sampler_logps is not None:  # the sampler's log-probs of the completion tokens, row after row
            batch["sampler_logps"] = sampler_logps
        if staleness is not None:  # an engine: optimizer steps between the sampling weights and these, per row
            batch["staleness"] = staleness
        return batch

    def _sample(self, index: int) -> dict:
        rows, rewards, sampler, staleness = self._draw(index)
        return place(self._batch(rows, rewards, sampler_logps=sampler, staleness=staleness), self.model)

    def _draw(self, index: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batch of samples `index`: (prompt_ids, completion_ids) rows, G per prompt, group-major;
        their scores (N,); the sampler's log-probs of their tokens, flat, row after row; with an
        engine, each row's staleness (N,), else None. Groups with a failed score are dropped; a
        draw that keeps none draws other prompts. With sampling.overlap the first draw may be the
        one prefetched while the previous batch trained, and this one's is launched at the end."""
        o, g = self.cfg.online, self.cfg.online.samples_per_prompt
        draw = self._generator(index)
        ahead, staleness = self.overlap.collect(index), None
        if ahead is not None:  # how long the trainer waited for it, in all (~0: sampling was hidden)
            self.stats["overlap"]["waited_s"] = round(self.overlap.waited_s, 3)
        if self.engine is not None:
            if ahead is None:  # drawn here, from the policy after the optimizer steps done before this batch
                self.overlap.push(self.model, self._steps_before(index))
            staleness = self._steps_before(index) - (ahead.version if ahead is not None else self.overlap.pushed)
        pool, fallback, draws, kept = [], [], self._max_draws(), None
        for attempt in range(draws):
            picks = self._picks(draw)
            drawn = ahead.result() if attempt == 0 and ahead is not None else self._request(index, attempt, picks)
            samples = [(s.prompt, s.completion) for s in drawn]
            texts = decode_completions(self.tokenizer, samples)
            plain = [render.plain_text(self.prompts[k]) for k in picks for _ in range(g)]
            rewards = torch.tensor(self.reward.score(plain, texts), dtype=torch.float32).view(-1, g)
            rewards = rewards - self._overlong_penalties(samples).view(-1, g)
            ok = torch.isfinite(rewards).all(dim=1)  # a group with a failed score is dropped whole
            self._counts.append({"samples": len(texts), "groups_failed": int((~ok).sum()),
                                 "reward_mean": rewards[ok].mean().item() if ok.any() else math.nan,
                                 **self._variance_counts(rewards, ok)})
            if (kept := self._keep(pool, fallback, ok, rewards, samples, drawn)) is not None:
                break
        if kept is None and (pool or fallback):  # dynamic sampling ran out of draws: train on the groups it has
            kept = self._kept(pool or fallback)
        if kept is None:
            raise ConfigError(self.reward.name, "online.reward", f"{draws} draws of {o.prompts_per_step} prompts "
                              "gave no group with every score finite; check the reward source")
        self._launch(index + 1)
        rows = kept[0]
        return (*kept, None if staleness is None else torch.full((len(rows),), float(staleness)))

    def _generator(self, index: int) -> random.Random:
        """The prompt generator of batch `index`: one seed for the draw and for its prefetch, which
        replays the draw's first picks."""
        return random.Random(f"{self.cfg.train.seed}/{index}/{self.rank}")

    def _picks(self, draw: random.Random) -> list[int]:
        """The prompts of one draw, from the batch's generator (the prefetch thread replays its first)."""
        return draw.sample(range(len(self.prompts)), min(self.cfg.online.prompts_per_step, len(self.prompts)))

    def _request(self, index: int, attempt: int, picks: list[int]) -> list:
        """Draw `attempt` of batch `index`: G samples of each picked prompt, seeded by (train.seed,
        index, attempt, process). The model is not run when an engine samples (the prefetch thread)."""
        o = self.cfg.online
        return sample_completions(self.model, self.tokenizer, [self.prompt_ids[k] for k in picks],
                                  n=o.samples_per_prompt, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                                  top_p=o.top_p, top_k=o.top_k,
                                  seed=self.cfg.train.seed + 100_003 * index + 1_009 * attempt + self.rank,
                                  with_logps=True, engine=self.engine)

    def _launch(self, index: int) -> None:
        """sampling.overlap: push the weights batch `index - 1` trains on, then draw batch `index`'s
        first draw in a thread (schedule: prefetch.py). Nothing past the run's last batch."""
        if not self.overlap.enabled or self._steps_before(index) >= self.cfg.train.max_steps:
            return
        self.overlap.push(self.model, self._steps_before(index - 1))
        picks = self._picks(self._generator(index))
        self.overlap.launch(index, lambda: self._request(index, 0, picks), len(picks))

    # ---- DAPO's dynamic sampling and overlong shaping (loss settings the source reads) ----

    @staticmethod
    def _budget(cfg, spec: LossSpec) -> dict:
        """A loss that divides by the generation budget (Dr. GRPO's dr_grpo_tokens, 0 by default)
        gets online.max_new_tokens."""
        if "dr_grpo_tokens" in spec.params and not cfg.loss.dr_grpo_tokens:
            return {"dr_grpo_tokens": cfg.online.max_new_tokens}
        return {}

    def _steps_before(self, index: int) -> int:
        """Optimizer steps done before batch of samples `index` trains (each batch is
        online.grpo_iterations micro-batches)."""
        return index * self.cfg.online.grpo_iterations // self.cfg.train.grad_accum

    def _max_draws(self) -> int:
        """Draws per batch of samples: retries after failed scores, or DAPO's dynamic sampling cap."""
        return self.cfg.loss.dynamic_sampling_max_draws if self.cfg.loss.dynamic_sampling else MAX_ATTEMPTS

    def _keep(self, pool: list, fallback: list, ok: torch.Tensor, rewards: torch.Tensor, samples: list,
              drawn: list):
        """The batch of samples once a draw completes it, else None. Without dynamic sampling the
        first draw with a finite group is the batch (its finite groups). With it, the groups whose
        rewards are not all equal join `pool` in draw order and the batch is the first
        min(online.prompts_per_step, prompts) of them; a group of equal rewards (advantage 0) is
        dropped. Should the draws run out first, `_draw` trains on the pool, or, when the pool is
        empty (every group equal), on `fallback`, the last draw's finite groups, which carry no
        policy-gradient signal, as in GRPO. Every draw is seeded by (batch index, attempt), so a
        resumed run draws the same."""
        g = self.cfg.online.samples_per_prompt

        def groups(keep: torch.Tensor) -> list:  # (rows, rewards (G,), sampler log-probs per row) per group
            rows = [range(k * g, (k + 1) * g) for k in keep.nonzero().flatten().tolist()]
            return [([samples[i] for i in r], rewards[r.start // g], [drawn[i].model_logps for i in r]) for r in rows]

        if not self.cfg.loss.dynamic_sampling:
            return self._kept(groups(ok)) if ok.any() else None
        pool.extend(groups(ok & (rewards.std(dim=1) > 0)))
        want = min(self.cfg.online.prompts_per_step, len(self.prompts))
        if len(pool) >= want:
            return self._kept(pool[:want])
        if ok.any():
            fallback[:] = groups(ok)
        return None

    @staticmethod
    def _kept(groups: list) -> tuple[list, torch.Tensor, torch.Tensor]:
        """(rows, rewards (N,), the sampler's log-probs flat) of (rows, rewards, logps) groups."""
        rows = [row for rows, _, _ in groups for row in rows]
        sampler = torch.tensor([lp for _, _, logps in groups for row in logps for lp in row], dtype=torch.float32)
        return rows, torch.cat([r for _, r, _ in groups]), sampler

    def _variance_counts(self, rewards: torch.Tensor, ok: torch.Tensor) -> dict:
        """With dynamic sampling: the draw's finite groups and those of them whose rewards are all equal."""
        if not self.cfg.loss.dynamic_sampling:
            return {}
        return {"groups_finite": int(ok.sum()), "groups_equal": int((ok & (rewards.std(dim=1) == 0)).sum())}

    def _overlong_penalties(self, samples: list) -> torch.Tensor:
        """DAPO's soft overlong punishment of each completion (0 when loss.overlong_buffer is 0)."""
        lengths = torch.tensor([len(c) for _, c in samples])
        return soft_overlong_penalty(lengths, self.cfg.online.max_new_tokens, buffer=self.cfg.loss.overlong_buffer,
                                     penalty=self.cfg.loss.overlong_penalty)

    def _truncated(self, rows: list) -> torch.Tensor:
        """1 for a completion cut off at online.max_new_tokens (no EOS at its end), per row."""
        eos, n = self.tokenizer.eos_token_id, self.cfg.online.max_new_tokens
        return torch.tensor([float(len(c) >= n and (not c or c[-1] != eos)) for _, c in rows])

    def probe_prompts(self, n: int) -> list[list[int]]:
        ids = self.eval_ids or self.prompt_ids
        return list({tuple(p): p for p in ids}.values())[:n]

    def step_metrics(self) -> dict:
        """Sample counts summed over the step's draws (every attempt)."""
        counts, self._counts = self._counts, []
        if not counts:
            return {}
        row = {"online/samples": sum(c["samples"] for c in counts),
               "online/groups_failed": sum(c["groups_failed"] for c in counts), "online/draws": len(counts)}
        if "groups_finite" in counts[0]:  # dynamic sampling: the share of equal-reward groups before dropping them
            finite = sum(c["groups_finite"] for c in counts)
            row["online/zero_variance_drawn"] = sum(c["groups_equal"] for c in counts) / finite if finite else math.nan
        return row

    def evaluate(self, model, reference) -> dict | None:
        """Held-out reward of the policy against the reference on the same prompts and seeds."""
        if not self.eval_ids:
            return None
        o = self.cfg.online
        return heldout_reward(model, reference, self.tokenizer, self.eval_prompts, self.eval_ids, self.reward,
                              n=o.eval_samples, max_new_tokens=o.max_new_tokens, seed=self.cfg.train.seed + 7,
                              temperature=o.temperature, top_p=o.top_p, top_k=o.top_k)


def run_grpo(cfg, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    """`preftune grpo` (and `preftune resume` of a GRPO run): train() on a GRPOSource."""
    if not cfg.online.prompts_path:
        raise ConfigError("defaults", "online.prompts_path", "is required")
    spec = build_loss(cfg.loss.name)
    eval_prompts = load_prompts(cfg.online.eval_prompts_path) if cfg.online.eval_prompts_path else None
    engine = engine_for(cfg)  # sampling.engine=vllm: a server that lives as long as this run
    source = GRPOSource(cfg, spec, load_prompts(cfg.online.prompts_path), reward_from_config(cfg.online), eval_prompts,
                        engine)
    with engine or nullcontext():
        return train(cfg, resume=resume, allow_config_change=allow_config_change, source=source)
