"""Records -> token ids with exact prompt/completion spans, plus a stated truncation policy.

Spans are token-level: the prompt and each completion are tokenized separately and their ids
concatenated, so the completion mask is exact (nothing is sliced by characters after
tokenization). Rendering (chat template, BOS exactly once, EOS) is `data/render.py`, the one
function every path shares.

EOS: every completion ends with the tokenizer's EOS id; it is appended unless the rendered
completion already ends with it (chat templates close assistant turns with it), and it counts
as a completion token, so the model learns to stop.

Truncation (counted, never silent): when prompt + longer completion exceeds `max_length`,
the prompt keeps its last `max_prompt_length` tokens, then both completions keep their first
`max_length - len(prompt)` tokens. Since max_prompt_length < max_length every completion keeps
at least one token. A pair whose chosen and rejected ids become identical is degenerate: an
error naming its line, or dropped and counted with `drop_overlong`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.errors import DataError
from .records import PreferenceRecord, Text, UnpairedRecord
from .render import as_messages, completion_ids, conversation_ids, prompt_ids, prompt_text

__all__ = ["TokenizedPair", "TokenizedExample", "TokenizeStats", "tokenize_records", "tokenize_unpaired", "truncate",
           "render_prompt", "tokenize_pair", "tokenize_example", "eos_id"]


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    line: int


@dataclass(frozen=True)
class TokenizedExample:
    """One unpaired (KTO) example."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str
    line: int


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    degenerate_kept: int = 0
    empty_completions: int = 0  # whitespace-only completions kept with allow_empty_completions (EOS only)
    dropped_eval_prompts: int = 0  # training rows removed because their prompt is an eval prompt
    boundary_mismatches: int = 0  # pairs whose apart-tokenized spans differ from the whole text's tokens
    desirable: int = 0          # unpaired data only
    undesirable: int = 0
    truncated_lines: list = field(default_factory=list)  # first few, for the report
    dropped_lines: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def render_prompt(tokenizer, prompt: Text) -> str:
    return prompt_text(tokenizer, prompt)


def _encode(tokenizer, prompt: Text, completions: list, where: tuple, names: tuple, eos: int):
    """Prompt ids and completion ids ending in EOS, through the one rendering (data/render.py). A
    chat template that refuses a record (Mistral's and Gemma's `raise_exception` on roles they do
    not take) is a DataError naming the record and its roles, not an internal error."""
    try:
        sides = [completion_ids(tokenizer, prompt, c, eos=eos, where=where, name=name)
                 for name, c in zip(names, completions)]
        return prompt_ids(tokenizer, prompt), sides
    except Exception as err:
        if not any(c.__module__.startswith("jinja2") for c in type(err).__mro__):
            raise
        roles = [m.get("role") for m in as_messages(prompt) if isinstance(m, dict)]
        raise DataError(*where, "prompt", f"the model's chat template refused this record (roles "
                        f"{', '.join(map(str, roles))}): {str(err).splitlines()[0][:200]}") from None


def _split_differs(tokenizer, prompt: Text, completion: Text, *, p_ids: list, c_ids: list, eos: int) -> bool:
    """Counted, not changed (data/render.py): the spans made apart are what generation produces."""
    whole = conversation_ids(tokenizer, prompt, completion)
    apart = p_ids + (c_ids[:-1] if c_ids[-1] == eos and (not whole or whole[-1] != eos) else c_ids)
    return apart != whole


def truncate(prompt: list, sides: list, max_length: int, max_prompt_length: int):
    """The policy in the module docstring; returns (prompt, sides, truncated?)."""
    if len(prompt) + max(len(s) for s in sides) <= max_length:
        return prompt, sides, False
    prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, [s[:room] for s in sides], True


def _is_empty(completion: Text) -> bool:
    """Whitespace-only text, or messages whose contents all are (kept only when allowed)."""
    if isinstance(completion, str):
        return not completion.strip()
    return not any(m["content"].strip() for m in completion)


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer", 0, "eos_token", "the tokenizer has no EOS token")
    return tokenizer.eos_token_id


def tokenize_records(records: list[PreferenceRecord], tokenizer, *, max_length: int, max_prompt_length: int,
                     drop_overlong: bool = False, allow_degenerate: bool = False,
                     ) -> tuple[list[TokenizedPair], TokenizeStats]:
    eos = eos_id(tokenizer)
    pairs, stats = [], TokenizeStats()
    for rec in records:
        pair = tokenize_pair(rec, tokenizer, stats, eos=eos, max_length=max_length, max_prompt_length=max_prompt_length,
                             drop_overlong=drop_overlong, allow_degenerate=allow_degenerate)
        if pair is not None:
            pairs.append(pair)
    return pairs, _finish(stats, pairs, records)


def tokenize_pair(rec: PreferenceRecord, tokenizer, stats: TokenizeStats, *, eos: int, max_length: int,
                  max_prompt_length: int, drop_overlong: bool = False, allow_degenerate: bool = False,
                  ) -> TokenizedPair | None:
    """One record's pair (None: dropped as overlong, counted in `stats`); what tokenize_records
    does per record, and what data.streaming calls as each record is reached."""
    where = (rec.source, rec.line)
    prompt, sides = _encode(tokenizer, rec.prompt, [rec.chosen, rec.rejected], where, ("chosen", "rejected"), eos)
    stats.empty_completions += _is_empty(rec.chosen) + _is_empty(rec.rejected)
    stats.boundary_mismatches += any(_split_differs(tokenizer, rec.prompt, c, p_ids=prompt, c_ids=ids, eos=eos)
                                     for c, ids in zip((rec.chosen, rec.rejected), sides))
    prompt, (chosen, rejected), truncated = truncate(prompt, sides, max_length, max_prompt_length)
    if chosen == rejected:
        problem = "chosen and rejected are identical" + (" after truncation" if truncated else " as tokens")
        if drop_overlong and truncated:
            stats.dropped += 1
            _note(stats.dropped_lines, rec.line)
            return None
        if not allow_degenerate:
            hint = "raise data.max_length or set data.drop_overlong=true" if truncated \
                else "set data.allow_degenerate=true to keep it"
            raise DataError(*where, "rejected", f"{problem} ({hint})")
        stats.degenerate_kept += 1
    if truncated:
        stats.truncated += 1
        _note(stats.truncated_lines, rec.line)
    return TokenizedPair(prompt, chosen, rejected, rec.source, rec.line)


def tokenize_unpaired(records: list[UnpairedRecord], tokenizer, *, max_length: int, max_prompt_length: int,
                      ) -> tuple[list[TokenizedExample], TokenizeStats]:
    eos = eos_id(tokenizer)
    stats = TokenizeStats()
    examples = [tokenize_example(rec, tokenizer, stats, eos=eos, max_length=max_length,
                                 max_prompt_length=max_prompt_length) for rec in records]
    return examples, _finish(stats, examples, records)


def tokenize_example(rec: UnpairedRecord, tokenizer, stats: TokenizeStats, *, eos: int, max_length: int,
                     max_prompt_length: int) -> TokenizedExample:
    """One unpaired (KTO) record, counted in `stats` (its label too)."""
    prompt, sides = _encode(tokenizer, rec.prompt, [rec.completion], (rec.source, rec.line), ("completion",), eos)
    stats.empty_completions += _is_empty(rec.completion)
    prompt, (completion,), truncated = truncate(prompt, sides, max_length, max_prompt_length)
    if truncated:
        stats.truncated += 1
        _note(stats.truncated_lines, rec.line)
    stats.desirable += rec.label
    stats.undesirable += not rec.label
    return TokenizedExample(prompt, completion, rec.label, rec.source, rec.line)


def _note(lines: list, line: int) -> None:
    """The first few lines only (the report shows five): a stream of millions keeps no list of them."""
    if len(lines) < 5:
        lines.append(line)


def _finish(stats: TokenizeStats, items: list, records: list) -> TokenizeStats:
    stats.pairs = len(items)
    stats.truncated_lines = stats.truncated_lines[:5]
    stats.dropped_lines = stats.dropped_lines[:5]
    if not items:
        src = records[0].source if records else "data"
        raise DataError(src, 1, "file", f"no usable pairs left ({stats.dropped} dropped as overlong)")
    return stats
