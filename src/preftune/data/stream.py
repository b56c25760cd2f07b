"""data.streaming: a preference file read, validated and tokenized as training consumes it.

The in-memory path (prepare.py) reads every record, then tokenizes them all before step 1; a
file of tens of millions of pairs does not fit. Here each pass over the file is a generator:

    iter_records (one row read and validated at a time, sources.py)
      -> the record steps of load_data (hh_as_chat, paired_to_unpaired, max_records, drop_eval_prompts)
      -> order: file order, or a seeded shuffle buffer (datasets' IterableDataset.shuffle)
      -> tokenize one record at a time (tokenize.py, the same function as in memory)

Memory is the buffer (`data.shuffle_buffer` records) plus one micro-batch, not the file.

Order. Pass p of a run seeded s shuffles with `random.Random(s + 1000003 * p)` (the in-memory
sampler's per-epoch seed): a buffer of B records is filled from the file; then each new record
takes the place of a uniformly drawn one, which is emitted; at the end the buffer is shuffled
and emptied. Like datasets' buffer this is a local shuffle: a record leaves at most about
B * ln(N) places after where it sits in the file, so a file sorted by source stays roughly sorted.

Position. Everything here is a function of (file, settings, seed, pass), so the n-th micro-batch
of a run is the same on every read: a resumed run re-reads the stream from the start and skips
the micro-batches its checkpoint already trained. When no record can be dropped after
tokenization (data.drop_overlong=false), one record is one example, and skipped micro-batches are
counted in records without being tokenized; otherwise they are tokenized to learn what dropped.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator

from .sources import HH_ASSISTANT, hh_as_messages, iter_records, to_unpaired

__all__ = ["stream_records", "held_out_prompts", "prompt_key", "shuffle_buffer", "ordered", "chunks", "UP_FRONT"]

UP_FRONT = 1000  # records read, validated and tokenized before the model loads (errors there cost nothing)


def prompt_key(prompt) -> str:
    """A prompt as a hashable key (message lists as sorted JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def stream_records(path: str, d, *, paired: bool = True, field: str = "file",
                   held_out: set | None = None, counter: list | None = None, lazy_files: bool = True) -> Iterator:
    """load_data's records one at a time, in file order: validated as read, HH transcripts as chat
    when asked (decided on the first record, as load_data does), pairs split for unpaired losses,
    the first `d.max_records`, rows whose prompt is held out dropped (`held_out`: prompt keys, see
    `held_out_prompts`). `counter[0]` counts the records read (what a test asserts to be small).
    `lazy_files=False`: the in-memory readers (a CSV or Parquet file read whole, a .json list taken),
    the records still one at a time (validate-data)."""
    convert = not paired and d.paired_to_unpaired
    records = iter_records(path, fmt=d.format, column_map=d.column_map, allow_degenerate=d.allow_degenerate,
                           allow_empty_completions=d.allow_empty_completions, paired=paired or convert,
                           field=field, revision=d.revision, streaming=lazy_files)
    if d.max_records:
        records = itertools.islice(records, d.max_records)
    as_chat = None
    for record in records:
        if counter is not None:
            counter[0] += 1
        if as_chat is None:  # as load_data: the first record decides for the file
            as_chat = bool(d.hh_as_chat and (paired or convert) and isinstance(record.prompt, str)
                           and HH_ASSISTANT in record.prompt)
        if as_chat:
            (record,) = hh_as_messages([record])
        if held_out and prompt_key(record.prompt) in held_out:
            continue
        yield from to_unpaired([record]) if convert else (record,)


def held_out_prompts(eval_records: list | None) -> set:
    """The prompt keys of held-out records (data.drop_eval_prompts)."""
    return {prompt_key(r.prompt) for r in eval_records or ()}


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """datasets' IterableDataset.shuffle(buffer_size=size): fill a buffer of `size`, then for each
    new item emit a uniformly drawn buffered one and put the new one in its place; at the end
    shuffle what is left and emit it."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def ordered(records: Iterator, *, seed: int | None, pass_index: int, buffer: int) -> Iterator:
    """A pass's records in training order: file order when `seed` is None (train.shuffle=false),
    else through a shuffle buffer seeded by (seed, pass)."""
    if seed is None:
        return records
    return shuffle_buffer(records, buffer, random.Random(seed + 1000003 * pass_index))


def chunks(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` (the last one shorter), as a DataLoader batches a sampler."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk
