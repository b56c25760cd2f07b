"""Where train()'s micro-batches come from: a batch source.

The loop in train.py asks a source for its data statistics, the loss's settings, held-out pairs
and probe prompts, starts it once the model sits on its device, then draws micro-batches epoch by
epoch (`batches(epoch, skip)`, where `skip` micro-batches of that epoch were trained before a
resume). Three sources exist:

- `OfflineSource` (here): a preference file, tokenized once, shuffled per epoch by (seed, epoch)
  alone, with cached reference log-probs when asked.
- `StreamingSource` (here, data.streaming): the same file read and tokenized as training consumes
  it, through a seeded shuffle buffer; micro-batch i depends only on (file, seed, i).
- `online.source.OnlineSource`: each micro-batch is sampled from the current policy, scored by a
  reward source and paired (online DPO); micro-batch i depends only on (seed, i) and the weights.

Both are deterministic functions of the seed, the position and the weights, which is what makes
a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from ..core.losses import Kind, LossSpec
from ..utils.devices import place
from ..utils.errors import ConfigError, DataError
from .collate import kl_pairs
from .layouts import Layout, choose_layout
from .order import EpochSampler
from .prepare import (
    kto_class_weights,
    load_data,
    pair_collator,
    prepare_data,
    prepare_pairs,
    unpaired_collator,
)
from .refcache import reference_cache
from .sources import no_records
from .stream import UP_FRONT, chunks, held_out_prompts, ordered, stream_records
from .tokenize import TokenizeStats, eos_id, tokenize_example, tokenize_pair

__all__ = ["BatchSource", "OfflineSource", "StreamingSource", "EpochLoader", "exact_layout", "file_layout",
           "distinct_prompts"]


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


def file_layout(cfg, spec: LossSpec, model, examples: list, tokenizer, model_dir: str):
    """The exact layout of a preference file's run, checked on its first examples: (the Layout,
    what was checked, the training collate function, the held-out one (None: padded rows))."""
    examples = examples[: max(cfg.train.batch_size, 2)]
    if spec.kind.data == "unpaired":  # KTO: checked like pairs, on (prompt i, completion i, completion i+1)
        chosen, info = exact_layout(cfg, spec.kind, model, kl_pairs(examples), tokenizer.pad_token_id, model_dir)
        return chosen, info, unpaired_collator(chosen, tokenizer), None
    chosen, info = exact_layout(cfg, spec.kind, model, examples, tokenizer.pad_token_id, model_dir)
    # training and held-out pairs in the layout just checked (start() may attach cached reference log-probs)
    collate = pair_collator(chosen, tokenizer)
    return chosen, info, collate, collate


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
    def load(cls, cfg, spec: LossSpec) -> OfflineSource | StreamingSource:
        """The file read and validated whole, or with data.streaming its first records only (StreamingSource)."""
        if cfg.data.streaming:
            return StreamingSource.load(cfg, spec)
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
        self.chosen, info, self.collate, self.eval_collate = file_layout(cfg, self.spec, model, self.data.examples,
                                                                         self.tokenizer, model_dir)
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


class StreamingSource:
    """A preference (or unpaired) file read, validated and tokenized as training consumes it
    (data.streaming; the pipeline, order and resume are in stream.py). Its first UP_FRONT records
    are validated and tokenized at `load`/`prepare`, before any weights load; a bad row further on
    stops the run when it is reached, as one DataError naming file, line and field. Held-out data
    (data.eval_path) is read whole, as in memory."""

    feeds = ("pairs", "unpaired", "reward_model")

    def __init__(self, cfg, spec: LossSpec, head: list, eval_records: list | None, held_out: set | None):
        self.cfg, self.spec, self.head, self.eval_records, self.held_out = cfg, spec, head, eval_records, held_out
        self.identity: dict = {}  # the file's hash is in checkpoint.fingerprint already (read in 16 MiB blocks)
        self.paired = spec.kind.data == "pairs"
        self.read = [0]  # records read by this run's passes (stream_records counts them)
        self.tokenized = 0  # records tokenized, up front and by the passes
        self.pass_index = 0

    @classmethod
    def load(cls, cfg, spec: LossSpec) -> StreamingSource:
        d = cfg.data
        if not d.train_path:
            raise ConfigError("defaults", "data.train_path", "is required")
        eval_records = load_data(d.eval_path, d, field="data.eval_path") if d.eval_path else None  # always pairs
        held_out = held_out_prompts(eval_records) if d.drop_eval_prompts else None
        head = list(itertools.islice(stream_records(d.train_path, d, paired=spec.kind.data == "pairs",
                                                    field="data.train_path", held_out=held_out), UP_FRONT))
        if not head:
            no_records(d.train_path)
        return cls(cfg, spec, head, eval_records, held_out)

    def prepare(self, tokenizer) -> None:
        d, self.tokenizer, self.eos = self.cfg.data, tokenizer, eos_id(tokenizer)
        up_front = TokenizeStats()
        self.examples = [x for x in (self._tokenize(r, up_front) for r in self.head) if x is not None]
        if not self.examples:
            raise DataError(d.train_path, 1, "file", f"no usable pairs in the first {len(self.head)} records "
                            f"({up_front.dropped} dropped as overlong)")
        up_front.pairs, validated, self.head = len(self.examples), len(self.head), None  # the records can go
        self.eval_pairs = prepare_pairs(d.eval_path, self.cfg, tokenizer, self.eval_records)[0] \
            if self.eval_records else None
        self.collate = pair_collator(Layout.asked(d), tokenizer) if self.paired \
            else unpaired_collator(Layout.asked(d), tokenizer)
        self.eval_collate = None
        self.loss_adjustments = {}
        if self.cfg.loss.kto_auto_weights and not self.paired:  # the class balance of what was read up front
            self.loss_adjustments["desirable_weight"], self.loss_adjustments["undesirable_weight"] = \
                kto_class_weights(up_front.desirable, up_front.undesirable)
        self.streamed = TokenizeStats()  # what the passes tokenized (summary.json's data.streaming)
        order = f"shuffle buffer of {d.shuffle_buffer}" if self.cfg.train.shuffle else "file order"
        self.stats = {**up_front.as_dict(), "streaming": {"validated_up_front": validated, "order": order,
                                                          "passes": 0, "records_read": 0, "micro_batches": 0}}

    def describe(self) -> str:
        s, up = self.stats["streaming"], self.stats
        return (f"streamed ({s['order']}); the first {s['validated_up_front']} records checked up front: "
                f"{up['pairs']} {self.spec.kind.example}s, {up['truncated']} truncated, {up['dropped']} dropped "
                f"(lines {up['truncated_lines'] or '-'}); the rest are checked as training reaches them")

    def layout(self, cfg, model, model_dir: str):
        self.chosen, info, self.collate, self.eval_collate = file_layout(cfg, self.spec, model, self.examples,
                                                                         self.tokenizer, model_dir)
        return self.chosen, info

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> None:
        t = cfg.train
        self.model, self.rank, self.processes = model, accelerator.process_index, accelerator.num_processes
        self.seed, self.batch_size, self.passes, self.max_steps = t.seed if t.shuffle else None, t.batch_size, \
            t.epochs, t.max_steps
        self.main = accelerator.is_main_process
        return None  # unknown length: train.max_steps is the run's (config.py refuses streaming without it)

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        """Micro-batches of passes 0..train.epochs-1 back to back (train() sees one endless epoch),
        from this process's micro-batch `skip` on: the stream is re-read from the start and the
        micro-batches already trained are skipped (stream.py, Position). With N processes, global
        micro-batch k goes to process k mod N, and a pass's last incomplete round of N is left out
        (every process must take the same number of steps)."""
        index, trained, s = 0, skip * self.processes, self.stats["streaming"]
        self.served = trained  # global micro-batches trained or skipped, for the error below
        try:
            for p in range(self.passes):
                self.pass_index, pending = p, []
                s["passes"] = p + 1
                for group in self._groups(p):
                    index += 1
                    if index <= trained:
                        continue
                    pending.append(group)
                    if len(pending) < self.processes:
                        continue
                    # every process tokenizes the whole round: a bad row stops them all at the same step
                    examples = [self._examples(g) for g in pending]
                    pending, s["records_read"], s["micro_batches"], self.served = [], self.read[0], index, index
                    self._count()
                    yield place(self.collate(examples[self.rank]), self.model)
        except DataError as err:
            raise DataError(err.path, err.line, err.field, f"{err.problem} (reached in pass {self.pass_index + 1} after "
                            f"{self.served} micro-batches: the run stopped there; fix the row, then `preftune resume RUN "
                            "--allow-config-change` continues from its newest checkpoint)") from None
        if self.main:
            print(f"data: the stream ended after {self.passes} pass(es) ({index} micro-batches), before "
                  f"train.max_steps={self.max_steps}; the schedule was laid out for {self.max_steps} steps", flush=True)

    def _groups(self, p: int) -> Iterator[list]:
        """Pass p's micro-batches: lists of records when none can be dropped (one record, one
        example: a skipped micro-batch is never tokenized), else of tokenized examples."""
        d = self.cfg.data
        records = ordered(stream_records(d.train_path, d, paired=self.paired, field="data.train_path",
                                         held_out=self.held_out, counter=self.read),
                          seed=self.seed, pass_index=p, buffer=d.shuffle_buffer)
        if not self._droppable():
            return chunks(records, self.batch_size)
        return chunks((x for x in (self._tokenize(r, self.streamed) for r in records) if x is not None),
                      self.batch_size)

    def _droppable(self) -> bool:
        return self.paired and self.cfg.data.drop_overlong

    def _examples(self, group: list) -> list:
        return group if self._droppable() else [self._tokenize(r, self.streamed) for r in group]

    def _tokenize(self, record, stats: TokenizeStats):
        d = self.cfg.data
        self.tokenized += 1
        if self.paired:
            return tokenize_pair(record, self.tokenizer, stats, eos=self.eos, max_length=d.max_length,
                                 max_prompt_length=d.max_prompt_length, drop_overlong=d.drop_overlong,
                                 allow_degenerate=d.allow_degenerate)
        return tokenize_example(record, self.tokenizer, stats, eos=self.eos, max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length)

    def _count(self) -> None:
        """The passes' tokenization counts into stats (summary.json's data.streaming)."""
        t = self.streamed
        self.stats["streaming"].update({"tokenized": self.tokenized, "truncated": t.truncated, "dropped": t.dropped,
                                        "truncated_lines": t.truncated_lines, "dropped_lines": t.dropped_lines})

    def probe_prompts(self, n: int) -> list[list[int]]:
        return distinct_prompts(self.eval_pairs or self.examples, n)

    def step_metrics(self) -> dict:
        return {"epoch": self.pass_index}  # the pass (train() counts one endless epoch)
