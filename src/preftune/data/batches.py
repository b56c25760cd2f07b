"""Where train()'s micro-batches come from: a batch source.

The loop in train.py asks a source for its data statistics, the loss's settings, held-out pairs
and probe prompts, starts it once the model sits on its device, then draws micro-batches epoch by
epoch (`batches(epoch, skip)`, where `skip` micro-batches of that epoch were trained before a
resume). Two sources exist:

- `OfflineSource` (here): a preference file, tokenized once, shuffled per epoch by (seed, epoch)
  alone, with cached reference log-probs when asked.
- `online.source.OnlineSource`: each micro-batch is sampled from the current policy, scored by a
  reward source and paired (online DPO); micro-batch i depends only on (seed, i) and the weights.

Both are deterministic functions of the seed, the position and the weights, which is what makes
a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from ..core.losses import Kind, LossSpec
from ..utils.errors import ConfigError
from .collate import kl_pairs
from .layouts import Layout, choose_layout
from .order import EpochSampler
from .prepare import load_data, pair_collator, prepare_data, unpaired_collator
from .refcache import reference_cache

__all__ = ["BatchSource", "OfflineSource", "EpochLoader", "exact_layout", "distinct_prompts"]


class BatchSource(Protocol):
    feeds: tuple  # the loss kinds (kinds.py) whose batches it makes; train() refuses any other
    stats: dict  # data_stats.json (and the summary's "data")
    loss_adjustments: dict  # data-derived changes to the loss's settings (KTO's class weights); train() reads the rest
    eval_pairs: list | None  # held-out tokenized pairs, or None
    eval_collate: object  # how probes and the final evaluation collate them (None: padded rows)
    identity: dict  # what a checkpoint must agree with besides the config (fingerprint keys)

    def prepare(self, tokenizer) -> None:
        """Tokenize (no model yet): errors in the data surface before any weights load."""

    def layout(self, cfg, model, model_dir: str) -> tuple[Layout, dict]:
        """The exact layout for this model (kept by the source for its collate functions), and what
        was checked."""

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> int | None:
        """Ready to draw; returns micro-batches per epoch (None: unbounded, the run needs max_steps)."""

    def batches(self, epoch: int, skip: int) -> Iterator[dict]: ...

    def probe_prompts(self, n: int) -> list[list[int]]: ...

    def step_metrics(self) -> dict:
        """Metrics of the source itself for the optimizer step just taken (online counts)."""

    def describe(self) -> str:
        """The one `data: ...` line printed at the start."""

    # optional: `modules(cfg, model, reference) -> dict[str, torch.nn.Module]`, the modules a source
    # trains beside the policy (PPO's critic), asked for once the policy is built; their trainable
    # parameters join the optimizer, gradient clipping, checkpoints and resume (named `<key>.<param>`),
    # and train() replaces each value of that same dict with its prepared (DDP-wrapped) module


def distinct_prompts(examples, n: int) -> list[list[int]]:
    """The first `n` distinct prompts (token ids) of tokenized examples, in file order."""
    seen, prompts = set(), []
    for ex in examples:
        key = tuple(ex.prompt_ids)
        if key not in seen:
            seen.add(key)
            prompts.append(ex.prompt_ids)
        if len(prompts) == n:
            break
    return prompts


def exact_layout(cfg, kind: Kind, model, examples, pad_id: int, model_dir: str):
    """The configured layout if it is exact on this model, else the exact one it falls back to
    (said once, recorded in data_stats.json and summary.json): (the Layout chosen, what was checked).
    `examples` are pair-shaped rows (an unpaired example with its KL row, a demonstration with
    itself): every kind but the reward model's packs its rows the same way."""
    d = cfg.data
    if kind.layout == "padded" and d.layout != "padded":  # the score head pools one sequence per row
        return Layout("padded", False), {"layout": "padded", "prefix_sharing": False,
                                         "reason": kind.name.replace("_", " ")}
    if d.layout == "padded":
        return Layout.asked(d), {"layout": d.layout, "prefix_sharing": d.prefix_sharing}
    layout, sharing, deltas = choose_layout(model, examples, pad_id, layout=d.layout, prefix_sharing=d.prefix_sharing,
                                            max_length=d.max_length, name=model_dir)
    return Layout(layout, sharing), {"layout": layout, "prefix_sharing": sharing, "checked": deltas}


class EpochLoader:
    """Micro-batches of a fixed list of examples, shuffled per epoch by (seed, epoch) alone, that
    a resumed run re-enters at any position (`epoch(e, skip)`): what every file-backed source
    (preference files here, demonstrations in sft.py) draws from."""

    def __init__(self, examples: list, collate, t, accelerator):
        self.sampler = EpochSampler(len(examples), t.seed if t.shuffle else None)
        # its own generator: each new iterator draws a seed, which must not consume the global RNG
        # that dropout uses (a resumed run creates one more iterator than an uninterrupted one)
        loader = DataLoader(examples, batch_size=t.batch_size, sampler=self.sampler, collate_fn=collate,
                            generator=torch.Generator().manual_seed(t.seed))
        self.loader, self.batch_size, self.processes = accelerator.prepare(loader), t.batch_size, \
            accelerator.num_processes

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip: int) -> Iterator[dict]:
        """Epoch `epoch` from its micro-batch `skip` on."""
        self.sampler.position(epoch, skip=skip * self.batch_size * self.processes)
        return iter(self.loader)


class OfflineSource:
    """A preference (or unpaired) file: validated at `load`, tokenized at `prepare`."""

    feeds = ("pairs", "unpaired", "reward_model")

    def __init__(self, cfg, spec: LossSpec, records: list, eval_records: list | None):
        self.cfg, self.spec, self.records, self.eval_records = cfg, spec, records, eval_records
        self.identity: dict = {}  # the file's hash is in checkpoint.fingerprint already

    @classmethod
    def load(cls, cfg, spec: LossSpec) -> OfflineSource:
        if not cfg.data.train_path:
            raise ConfigError("defaults", "data.train_path", "is required")
        records = load_data(cfg.data.train_path, cfg.data, paired=spec.kind.data == "pairs", field="data.train_path")
        eval_records = load_data(cfg.data.eval_path, cfg.data, field="data.eval_path") \
            if cfg.data.eval_path else None  # always pairs
        return cls(cfg, spec, records, eval_records)

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.data = prepare_data(self.cfg, self.spec, tokenizer, self.records, self.eval_records)
        self.loss_adjustments, self.eval_pairs, self.collate = self.data.adjustments, self.data.eval_pairs, self.data.collate
        self.stats = self.data.stats.as_dict()

    def describe(self) -> str:
        s = self.data.stats
        return (f"{s.pairs} {self.spec.kind.example}s, {s.truncated} truncated, {s.dropped} "
                f"dropped (lines {s.truncated_lines or '-'}), {s.dropped_eval_prompts} dropped as eval prompts")

    def layout(self, cfg, model, model_dir: str):
        examples = self.data.examples[: max(cfg.train.batch_size, 2)]
        if self.spec.kind.data == "unpaired":  # KTO: checked like pairs, on (prompt i, completion i, completion i+1)
            self.chosen, info = exact_layout(cfg, self.spec.kind, model, kl_pairs(examples),
                                             self.tokenizer.pad_token_id, model_dir)
            self.collate, self.eval_collate = unpaired_collator(self.chosen, self.tokenizer), None
            return self.chosen, info
        self.chosen, info = exact_layout(cfg, self.spec.kind, model, examples, self.tokenizer.pad_token_id,
                                         model_dir)
        # training and held-out pairs in the layout just checked (start() may attach cached reference log-probs)
        self.collate = self.eval_collate = pair_collator(self.chosen, self.tokenizer)
        return self.chosen, info

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> int:
        t = cfg.train
        if t.reference_cache and self.spec.needs_reference and self.spec.kind.data == "pairs":
            cached = reference_cache(cfg, self.data, model, reference, self.tokenizer, reference_info, fp,
                                     accelerator, self.chosen)
            self.collate = pair_collator(self.chosen, self.tokenizer, cached)
        self.loader = EpochLoader(self.data.examples, self.collate, t, accelerator)
        return len(self.loader)

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        return self.loader.epoch(epoch, skip)

    def probe_prompts(self, n: int) -> list[list[int]]:
        return distinct_prompts(self.eval_pairs or self.data.examples, n)

    def step_metrics(self) -> dict:
        return {}
