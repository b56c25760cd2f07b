"""What a run's data becomes before the loop: validated records, tokenized examples, the loss's
settings and the collate function. Called by train.py, evaluation, online sources and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..config import Config
from ..core.losses import LossSpec
from . import collate_pairs, collate_unpaired, load_records, to_unpaired, tokenize_records, tokenize_unpaired
from .collate import attach_reference, collate_packed_pairs, collate_packed_unpaired
from .layouts import Layout
from .sources import HH_ASSISTANT, hh_as_messages
from .stream import held_out_prompts, prompt_key

__all__ = ["load_data", "prepare_pairs", "drop_eval_prompts", "kto_class_weights", "PreparedData",
           "prepare_data", "pair_collator", "unpaired_collator"]


def load_data(path: str, d, *, paired: bool = True, field: str = "file") -> list:
    """Read and validate one data file with a `DataConfig`'s settings (no tokenizer needed).

    Unpaired losses read prompt/completion/label files, or pairs split in two when
    `d.paired_to_unpaired` is set. `field`: the setting `path` came from (named by hub errors).
    """
    convert = not paired and d.paired_to_unpaired
    records = load_records(path, fmt=d.format, column_map=d.column_map, max_records=d.max_records,
                           allow_degenerate=d.allow_degenerate, allow_empty_completions=d.allow_empty_completions,
                           paired=paired or convert, field=field, revision=d.revision)
    # pairs read for KTO (`convert`) are still pairs here: they get the same chat turns as for paired losses
    if d.hh_as_chat and (paired or convert) and records and isinstance(records[0].prompt, str) \
            and HH_ASSISTANT in records[0].prompt:
        records = hh_as_messages(records)
    return to_unpaired(records) if convert else records


def prepare_pairs(path: str, cfg: Config, tokenizer, records: list | None = None):
    """Load (unless given), validate and tokenize one paired data file with the config's settings."""
    d = cfg.data
    records = load_data(path, d) if records is None else records
    return tokenize_records(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                            drop_overlong=d.drop_overlong, allow_degenerate=d.allow_degenerate)


def drop_eval_prompts(records: list, eval_records: list) -> tuple[list, int]:
    """Training rows whose prompt is also an eval prompt are removed; returns (kept, dropped)."""
    held = held_out_prompts(eval_records)
    kept = [r for r in records if prompt_key(r.prompt) not in held]
    return kept, len(records) - len(kept)


def kto_class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """Weights with w_d * n_d == w_u * n_u (KTO paper, Sec. 4.2 asks for a ratio in [1, 4/3]);
    the larger class keeps weight 1."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if n_desirable >= n_undesirable:
        return 1.0, n_desirable / n_undesirable
    return n_undesirable / n_desirable, 1.0


@dataclass
class PreparedData:
    examples: list
    stats: object
    collate: object
    eval_pairs: list | None
    adjustments: dict  # loss settings derived from the data (KTO's class weights), over the config's


def prepare_data(cfg: Config, spec: LossSpec, tokenizer, records, eval_records) -> PreparedData:
    d = cfg.data
    held_out_dropped = 0
    if d.drop_eval_prompts and eval_records:
        records, held_out_dropped = drop_eval_prompts(records, eval_records)
    if spec.kind.data == "pairs":
        examples, stats = prepare_pairs(d.train_path, cfg, tokenizer, records)
        collate = pair_collator(Layout.asked(d), tokenizer)
    else:
        examples, stats = tokenize_unpaired(records, tokenizer, max_length=d.max_length,
                                            max_prompt_length=d.max_prompt_length)
        collate = unpaired_collator(Layout.asked(d), tokenizer)
    stats.dropped_eval_prompts = held_out_dropped
    eval_pairs = prepare_pairs(d.eval_path, cfg, tokenizer, eval_records)[0] if eval_records else None
    adjustments = {}
    if cfg.loss.kto_auto_weights and spec.kind.data == "unpaired":
        adjustments["desirable_weight"], adjustments["undesirable_weight"] = kto_class_weights(stats.desirable,
                                                                                               stats.undesirable)
    return PreparedData(examples, stats, collate, eval_pairs, adjustments)


def pair_collator(layout: Layout, tokenizer, reference_cache: dict | None = None):
    """The collate function for paired micro-batches: packed (default) or padded rows, with
    cached reference logps attached when there is a cache."""
    if layout.layout == "packed":
        collate = partial(collate_packed_pairs, prefix_sharing=layout.prefix_sharing)
    else:
        collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    if reference_cache is None:
        return collate
    return lambda pairs: attach_reference(collate(pairs), pairs, reference_cache)


def unpaired_collator(layout: Layout, tokenizer):
    """The collate function for unpaired (KTO) micro-batches: packed (default; each example and its
    KL row share the prompt) or padded rows."""
    if layout.layout == "packed":
        return partial(collate_packed_unpaired, prefix_sharing=layout.prefix_sharing)
    return partial(collate_unpaired, pad_id=tokenizer.pad_token_id)
