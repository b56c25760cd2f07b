"""Online DPO as a batch source of train()'s one loop: every micro-batch is sampled from the
policy as it is at that moment, scored, paired and collated.

Micro-batch i draws `online.prompts_per_step` prompts with a generator seeded by (train.seed, i,
process) and samples with seed (train.seed, i, attempt), so it depends only on its position and
the current weights: a resumed run draws exactly the batches the uninterrupted one drew. When a
draw yields no pair (every group tied, or a failed judge), the next attempt draws other prompts;
after `MAX_ATTEMPTS` empty draws the run stops with one line (the reward cannot rank samples).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from ...core.losses import LossSpec, build_loss
from ...data import render
from ...data.batches import distinct_prompts, exact_layout
from ...data.layouts import Layout
from ...data.prepare import load_data, pair_collator, prepare_pairs
from ...data.records import PreferenceRecord
from ...data.tokenize import tokenize_records
from ...models.vllm_engine import engine_for
from ...training.train import RunResult, train
from ...utils.devices import place
from ...utils.errors import ConfigError, DataError
from .rollouts import generate_and_pair, load_prompts, reward_from_config

__all__ = ["OnlineSource", "MAX_ATTEMPTS", "run_online"]

MAX_ATTEMPTS = 8
_COUNTS = ("pairs", "ties", "failed", "below_margin", "samples")


class OnlineSource:
    """Pairs sampled from the current policy, `online.prompts_per_step` prompts per micro-batch."""

    feeds = ("pairs",)

    def __init__(self, cfg, spec: LossSpec, prompts: list, reward, engine=None):
        if spec.kind.name not in self.feeds:
            raise ConfigError("defaults", "loss.name", f"online mode builds pairs; {spec.name!r} trains on {spec.kind.data}")
        if not cfg.train.max_steps:
            raise ConfigError("defaults", "train.max_steps", "online mode needs a number of steps (> 0)")
        self.cfg, self.spec, self.prompts, self.reward = cfg, spec, prompts, reward
        self.engine = engine  # models/vllm_engine.VLLMEngine, or None: the built-in sampler
        if cfg.sampling.overlap:  # stale pairs would need a correction the pair losses do not have
            raise ConfigError("defaults", "sampling.overlap", "is for preftune grpo and ppo, whose losses correct "
                              "samples from older weights (loss.tis_cap); online DPO pairs have no such correction")
        self.eval_records = load_data(cfg.data.eval_path, cfg.data) if cfg.data.eval_path else None
        digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
        self.identity = {"online.prompts_sha256": digest, "online.reward_name": reward.name,
                         **{f"online.{k}": v for k, v in vars(cfg.online).items()
                            if k not in {"eval_prompts_path", "eval_samples", "rounds", "refresh_reference"}}}
        self.stats = {"source": "online", "prompts": len(prompts), "reward": reward.name}
        self.loss_adjustments: dict = {}
        self._counts: list[dict] = []

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = [render.prompt_ids(tokenizer, p) for p in self.prompts]
        self.eval_pairs = prepare_pairs(self.cfg.data.eval_path, self.cfg, tokenizer, self.eval_records)[0] \
            if self.eval_records else None
        self.collate = pair_collator(Layout.asked(self.cfg.data), tokenizer)

    def describe(self) -> str:
        o = self.cfg.online
        return (f"online, {len(self.prompts)} prompts, {o.prompts_per_step} per micro-batch x "
                f"{o.samples_per_prompt} samples, reward {self.reward.name}")

    def layout(self, cfg, model, model_dir: str):
        """Checked on pairs made of the first prompts and two short stand-in completions: the
        check is about the model's attention, not about what the completions say."""
        records = [PreferenceRecord(p, " yes, it is.", " no.", "layout check", i + 1)
                   for i, p in enumerate(self.prompts[: max(2, min(len(self.prompts), cfg.train.batch_size))])]
        examples, _ = tokenize_records(records, self.tokenizer, max_length=cfg.data.max_length,
                                       max_prompt_length=cfg.data.max_prompt_length, drop_overlong=True,
                                       allow_degenerate=True)
        chosen, info = exact_layout(cfg, self.spec.kind, model, examples, self.tokenizer.pad_token_id, model_dir) \
            if examples else (Layout.asked(cfg.data), {"layout": cfg.data.layout, "prefix_sharing": cfg.data.prefix_sharing})
        self.collate = pair_collator(chosen, self.tokenizer)
        self.eval_collate = pair_collator(chosen, self.tokenizer) if examples else None
        return chosen, info

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> None:
        self.model, self.rank = model, accelerator.process_index
        if self.engine is not None:  # the server starts while the loop sets up; the first draw waits for it
            self.engine.start(Path(cfg.run.output_dir) / "vllm")
        return None  # unbounded: train.max_steps is the length of the run

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        index = skip
        while True:
            yield self._micro_batch(index)
            index += 1

    def _micro_batch(self, index: int) -> dict:
        o, seed = self.cfg.online, self.cfg.train.seed
        draw = random.Random(f"{seed}/{index}/{self.rank}")
        if self.engine is not None:  # the policy after the optimizer steps done so far
            self.engine.sync(self.model, step=index // self.cfg.train.grad_accum)
        for attempt in range(MAX_ATTEMPTS):
            prompts = draw.sample(self.prompts, min(o.prompts_per_step, len(self.prompts)))
            pairs, counts = generate_and_pair(self.model, self.tokenizer, prompts, self.reward, o,
                                              seed=seed + 100_003 * index + 1_009 * attempt + self.rank,
                                              engine=self.engine)
            self._counts.append(counts)
            records = [PreferenceRecord(p["prompt"], p["chosen"], p["rejected"], "online", i + 1)
                       for i, p in enumerate(pairs)]
            if records:
                examples = self._tokenize(records)
                if examples:
                    return place(self.collate(examples), self.model)
        raise ConfigError(self.reward.name, "online.reward", f"{MAX_ATTEMPTS} draws of {o.prompts_per_step} prompts "
                          "gave no pair (every group of samples tied or failed to score); check the reward source, "
                          "or raise online.samples_per_prompt or online.temperature")

    def _tokenize(self, records: list) -> list:
        """Tokenized pairs; none when every pair is too long even after truncation."""
        try:
            return tokenize_records(records, self.tokenizer, max_length=self.cfg.data.max_length,
                                    max_prompt_length=self.cfg.data.max_prompt_length, drop_overlong=True,
                                    allow_degenerate=True)[0]
        except DataError:  # "no usable pairs left": all dropped as overlong
            return []

    def probe_prompts(self, n: int) -> list[list[int]]:
        if self.eval_pairs:
            return distinct_prompts(self.eval_pairs, n)
        return list({tuple(p): p for p in self.prompt_ids}.values())[:n]

    def step_metrics(self) -> dict:
        """Sample counts summed over the step's draws (every attempt), and their mean reward."""
        counts, self._counts = self._counts, []
        if not counts:
            return {}
        row = {f"online/{k}": sum(c[k] for c in counts) for k in _COUNTS}
        means = [c["reward_mean"] for c in counts if math.isfinite(c["reward_mean"])]
        row["online/reward_mean"] = sum(means) / len(means) if means else math.nan
        row["online/draws"] = len(counts)
        if "position_inconsistent" in counts[0]:  # online.judge_mode=pairwise
            row["online/position_inconsistent"] = sum(c["position_inconsistent"] for c in counts)
        return row


def run_online(cfg, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    """`preftune online` (and `preftune resume` of an online run): train() on an OnlineSource."""
    if not cfg.online.prompts_path:
        raise ConfigError("defaults", "online.prompts_path", "is required")
    spec = build_loss(cfg.loss.name, cfg.loss.mix)
    engine = engine_for(cfg)  # sampling.engine=vllm: a server that lives as long as this run
    source = OnlineSource(cfg, spec, load_prompts(cfg.online.prompts_path), reward_from_config(cfg.online), engine)
    with engine or nullcontext():
        return train(cfg, resume=resume, allow_config_change=allow_config_change, source=source)
