"""`preftune sft`: supervised fine-tuning on demonstrations, as a batch source of train()'s one loop.

The stage before DPO: the loss is the token-mean NLL of the completion tokens only (losses
`nll`), on prompt/completion or conversational data (data/demos.py), or on the chosen side of a
preference file. Rendering is the one function every path uses (data/render.py), so the SFT
model is trained on exactly the tokens DPO will later score. Rows are packed (one row per
micro-batch, block-diagonal attention, no padding) when the layout check finds packing exact
on the model, else padded. Everything else is train()'s: LoRA or full, schedule, accumulation,
NaN guard, checkpoints and exact resume, probes (sample length), health checks, the report.

Held-out: with `data.eval_path`, the NLL per token and perplexity of the held-out completions
are measured on the starting weights (when the source starts, before any step) and at the end,
so summary.json holds both. The result (RUN/model) is a PEFT adapter (LoRA) or a model
directory: the next stage starts from it with `model.adapter_name_or_path=RUN/model` (LoRA; the
DPO reference is then the SFT model) or `model.name_or_path=RUN/model` (full).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from functools import partial

import torch

from ..config import Config
from ..core.logprobs import completion_logps
from ..core.losses import LOSSES, build_loss
from ..core.losses.kinds import DEMONSTRATIONS
from ..data.batches import EpochLoader, distinct_prompts, exact_layout
from ..data.collate import collate_packed, collate_sequences
from ..data.demos import DEMO_FORMATS, is_demonstration_file, load_demonstrations
from ..data.prepare import load_data
from ..data.records import UnpairedRecord
from ..data.tokenize import TokenizedPair, tokenize_unpaired
from ..training.train import RunResult, train
from ..utils.errors import ConfigError
from ..utils.progress import progress

__all__ = ["SFTSource", "run_sft", "load_sft_records", "heldout_nll"]


def load_sft_records(path: str, d, field: str = "data.train_path") -> tuple[list[UnpairedRecord], str]:
    """Demonstrations from `path`, and what they are ("demonstrations" or "chosen side of pairs").
    `field`: the setting that named the path (for hub-id errors)."""
    if d.format in DEMO_FORMATS or (d.format == "auto" and is_demonstration_file(path, column_map=d.column_map,
                                                                                 field=field)):
        fmt = d.format if d.format in DEMO_FORMATS else "auto"
        return load_demonstrations(path, fmt=fmt, column_map=d.column_map, max_records=d.max_records,
                                   allow_empty_completions=d.allow_empty_completions, field=field), "demonstrations"
    pairs = load_data(path, dataclasses.replace(d, allow_degenerate=True), field=field)  # a preference file: its chosen side
    return [UnpairedRecord(r.prompt, r.chosen, True, r.source, r.line) for r in pairs], "chosen side of pairs"


def _collate_packed(examples: list) -> dict:
    groups = [(e.prompt_ids, [(i, e.completion_ids)]) for i, e in enumerate(examples)]
    return collate_packed(groups, len(examples), prefix_sharing=False)


def _collate_padded(examples: list, pad_id: int) -> dict:
    return collate_sequences([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)


def sft_collator(layout: str, pad_id: int):
    return _collate_packed if layout == "packed" else partial(_collate_padded, pad_id=pad_id)


@torch.no_grad()
def heldout_nll(model, examples: list, collate, *, batch_size: int, desc: str = "eval") -> dict:
    """NLL per completion token (all tokens weigh the same) and perplexity of `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for i in progress(starts, total=len(examples), desc=desc, unit="examples",
                      weights=[len(examples[i:i + batch_size]) for i in starts]):
        logps, counts = completion_logps(model, collate(examples[i:i + batch_size]))
        total, tokens = total - float(logps.sum()), tokens + int(counts.sum())
    model.train(was_training)
    nll = total / max(tokens, 1)
    return {"nll/token": nll, "perplexity": math.exp(min(nll, 50.0)), "examples": len(examples), "tokens": tokens}


class SFTSource:
    """Demonstrations from `data.train_path` (and held-out ones from `data.eval_path`)."""

    feeds = ("demonstrations",)

    def __init__(self, cfg: Config, records: list, eval_records: list | None, kind: str):
        self.cfg, self.records, self.eval_records, self.kind = cfg, records, eval_records, kind
        self.identity: dict = {}  # the file's hash is in checkpoint.fingerprint already
        self.eval_pairs, self.eval_collate, self.loss_adjustments = None, None, {}
        self.before: dict | None = None

    @classmethod
    def load(cls, cfg: Config) -> SFTSource:
        if not cfg.data.train_path:
            raise ConfigError("defaults", "data.train_path", "is required")
        records, kind = load_sft_records(cfg.data.train_path, cfg.data)
        eval_records = load_sft_records(cfg.data.eval_path, cfg.data, "data.eval_path")[0] if cfg.data.eval_path \
            else None
        return cls(cfg, records, eval_records, kind)

    def _tokenize(self, records: list) -> tuple[list, object]:
        d = self.cfg.data
        return tokenize_unpaired(records, self.tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length)

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.examples, stats = self._tokenize(self.records)
        self.eval_examples = self._tokenize(self.eval_records)[0] if self.eval_records else None
        self.stats = {**{k: v for k, v in stats.as_dict().items() if k not in {"desirable", "undesirable"}},
                      "examples": len(self.examples), "source": self.kind}
        self.collate = sft_collator(self.cfg.data.layout, tokenizer.pad_token_id)

    def describe(self) -> str:
        s = self.stats
        return (f"{s['examples']} demonstrations ({self.kind}), {s['truncated']} truncated (lines "
                f"{s['truncated_lines'] or '-'})" + (f", {len(self.eval_examples)} held out" if self.eval_examples else ""))

    def layout(self, cfg, model, model_dir: str):
        """Packing is checked like pairs are (layouts.choose_layout), on the first demonstrations
        as (prompt, completion, completion) rows; nothing is shared between rows (no prefix)."""
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefix_sharing=False))
        rows = [TokenizedPair(e.prompt_ids, e.completion_ids, e.completion_ids, e.source, e.line)
                for e in self.examples[: max(cfg.train.batch_size, 2)]]
        chosen, info = exact_layout(cfg, DEMONSTRATIONS, model, rows, self.tokenizer.pad_token_id, model_dir)
        self.collate = sft_collator(chosen.layout, self.tokenizer.pad_token_id)
        return chosen, info

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> int:
        t = cfg.train
        if self.eval_examples:  # the starting weights (a resumed run has not loaded its checkpoint yet)
            self.before = heldout_nll(model, self.eval_examples, self.collate, batch_size=cfg.eval.batch_size,
                                      desc="held-out NLL (start)")
        self.loader = EpochLoader(self.examples, self.collate, t, accelerator)
        return len(self.loader)

    def batches(self, epoch: int, skip: int) -> Iterator[dict]:
        return self.loader.epoch(epoch, skip)

    def probe_prompts(self, n: int) -> list[list[int]]:
        return distinct_prompts(self.eval_examples or self.examples, n)

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, model, reference) -> dict | None:
        """Held-out NLL/token and perplexity before (starting weights) and after training."""
        if not self.eval_examples:
            return None
        after = heldout_nll(model, self.eval_examples, self.collate, batch_size=self.cfg.eval.batch_size,
                            desc="held-out NLL (end)")
        before = self.before or {}
        return {**after, "nll/token_before": before.get("nll/token"), "perplexity_before": before.get("perplexity"),
                "nll/token_change": after["nll/token"] - before["nll/token"] if before else None}


def run_sft(cfg: Config, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    """`preftune sft` (and `preftune resume` of an SFT run): train() on an SFTSource."""
    if build_loss(cfg.loss.name).kind.name not in SFTSource.feeds:
        raise ConfigError("defaults", "loss.name", f"{cfg.loss.name!r} is not a supervised loss; preftune sft "
                          f"trains with {', '.join(n for n, s in LOSSES.items() if s.kind.name in SFTSource.feeds)}")
    return train(cfg, resume=resume, allow_config_change=allow_config_change, source=SFTSource.load(cfg))
