"""Records -> token ids with exact prompt/completion spans, plus a stated truncation policy.

Spans are token-level: the prompt and each completion are tokenized separately and their ids
concatenated, so the completion mask is exact (nothing is sliced by characters after
tokenization). Chat-message records are rendered with the tokenizer's chat template: the
prompt with the generation prompt, the completion as the template's text that follows it.

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

from ..errors import DataError
from .records import PreferenceRecord, Text

__all__ = ["TokenizedPair", "TokenizeStats", "tokenize_records", "render_prompt"]


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    line: int


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    degenerate_kept: int = 0
    empty_completions: int = 0  # completions that are EOS only (kept with allow_empty_completions)
    truncated_lines: list = field(default_factory=list)  # first few, for the report
    dropped_lines: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def render_prompt(tokenizer, prompt: Text) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _completion_text(tokenizer, prompt: Text, completion: Text, where: tuple, name: str) -> str:
    if isinstance(completion, str):
        return completion
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(*where, name, "the chat template does not render the prompt as a prefix of the conversation")
    text = full[len(prompt_text):]
    # drop the template's trailing newline after the end-of-turn token; EOS is the last token
    eos = tokenizer.eos_token
    return text.rstrip() if eos and text.rstrip().endswith(eos) else text


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_records(records: list[PreferenceRecord], tokenizer, *, max_length: int, max_prompt_length: int,
                     drop_overlong: bool = False, allow_degenerate: bool = False,
                     ) -> tuple[list[TokenizedPair], TokenizeStats]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer", 0, "eos_token", "the tokenizer has no EOS token")
    pairs, stats = [], TokenizeStats()
    for rec in records:
        where = (rec.source, rec.line)
        prompt = _ids(tokenizer, render_prompt(tokenizer, rec.prompt), special=True)
        sides = []
        for name, completion in (("chosen", rec.chosen), ("rejected", rec.rejected)):
            ids = _ids(tokenizer, _completion_text(tokenizer, rec.prompt, completion, where, name), special=False)
            sides.append(ids if ids and ids[-1] == eos else ids + [eos])
        chosen, rejected = sides
        stats.empty_completions += (chosen == [eos]) + (rejected == [eos])
        truncated = len(prompt) + max(len(chosen), len(rejected)) > max_length
        if truncated:
            prompt = prompt[-max_prompt_length:]
            room = max_length - len(prompt)
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            problem = "chosen and rejected are identical" + (" after truncation" if truncated else " as tokens")
            if drop_overlong and truncated:
                stats.dropped += 1
                stats.dropped_lines.append(rec.line)
                continue
            if not allow_degenerate:
                hint = "raise data.max_length or set data.drop_overlong=true" if truncated \
                    else "set data.allow_degenerate=true to keep it"
                raise DataError(*where, "rejected", f"{problem} ({hint})")
            stats.degenerate_kept += 1
        if truncated:
            stats.truncated += 1
            stats.truncated_lines.append(rec.line)
        pairs.append(TokenizedPair(prompt, chosen, rejected, rec.source, rec.line))
    stats.pairs = len(pairs)
    stats.truncated_lines = stats.truncated_lines[:5]
    stats.dropped_lines = stats.dropped_lines[:5]
    if not pairs:
        src = records[0].source if records else "data"
        raise DataError(src, 1, "file", f"no usable pairs left ({stats.dropped} dropped as overlong)")
    return pairs, stats
