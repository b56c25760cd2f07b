"""Demonstrations for supervised fine-tuning (`preftune sft`): rows -> (prompt, completion) records.

Formats (detected from the first record, like preference files; one format per file):
- `prompt_completion`: {"prompt": ..., "completion": ...} (or "response"), each a string or a
  message list (the completion then starts with an assistant message); a `label` column, if
  present, must be true (KTO files mark undesirable rows false: they are not demonstrations).
- `messages`: {"messages": [...]}: the conversation up to its last message is the prompt and the
  last message, which must be the assistant's, is the completion. The loss is on that last turn
  only; earlier assistant turns are context.
Preference files (prompt/chosen/rejected, HH transcripts, ...) are demonstrations too: sft.py
takes their chosen side (the DPO paper's "SFT on the preferred completions").
Errors name the file, the line and the field, as everywhere else.
"""

from __future__ import annotations

from pathlib import Path

from ..utils.errors import DataError
from .records import UnpairedRecord
from .sources import _messages, _text, mapped_rows, no_records, read_rows, split_path

__all__ = ["DEMO_FORMATS", "load_demonstrations", "is_demonstration_file"]


def _completion_key(row: dict) -> str:
    return "completion" if "completion" in row else "response"


def _prompt_completion(row: dict, where: tuple, allow_empty: bool):
    key = _completion_key(row)
    if "label" in row and row["label"] not in (True, 1, "true", "True", "1"):
        raise DataError(*where, "label", f"is {row['label']!r}: only desirable rows are demonstrations "
                        "(remove the others, or train KTO on this file with `preftune train`)")
    if isinstance(row.get("prompt"), list) or isinstance(row.get(key), list):
        prompt, completion = _messages(row, "prompt", where), _messages(row, key, where)
        if completion[0]["role"] != "assistant":
            raise DataError(*where, f"{key}[0].role", "the completion must start with an assistant message")
        if not allow_empty and not any(m["content"].strip() for m in completion):
            raise DataError(*where, key, "empty completion")
        return prompt, completion
    return _text(row, "prompt", where, allow_empty=True), _text(row, key, where, allow_empty=allow_empty)


def _conversation(row: dict, where: tuple, allow_empty: bool):
    messages = _messages(row, "messages", where)
    last = len(messages) - 1
    if messages[-1]["role"] != "assistant":
        raise DataError(*where, f"messages[{last}].role", "the last message must be the assistant's (the completion)")
    if last == 0:
        raise DataError(*where, "messages", "only an assistant message: there is no prompt before it")
    if not allow_empty and not messages[-1]["content"].strip():
        raise DataError(*where, f"messages[{last}].content", "empty completion")
    return messages[:-1], messages[-1:]


DEMO_FORMATS = {"prompt_completion": _prompt_completion, "messages": _conversation}


def _detect(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "prompt_completion"
    return None


def is_demonstration_file(path: str | Path, *, column_map: dict | None = None, field: str = "file") -> bool:
    """True when the file's first record is a demonstration (else it may be a preference file)."""
    file, _ = split_path(path)
    for _, row in read_rows(file, field=field):
        if isinstance(row, dict):
            return _detect({(column_map or {}).get(k, k): v for k, v in row.items()}) is not None
    return False


def load_demonstrations(path: str | Path, *, fmt: str = "auto", column_map: dict | None = None,
                        max_records: int = 0, allow_empty_completions: bool = False,
                        field: str = "file") -> list[UnpairedRecord]:
    """Read and validate a demonstration file (a `file.jsonl[:500]` slice works) into records
    with label True. An empty file (or slice) is an error."""
    records, adapter = [], None
    for where, row in mapped_rows(path, column_map=column_map, field=field):
        if adapter is None:
            name = _detect(row) if fmt == "auto" else fmt
            if name not in DEMO_FORMATS:
                raise DataError(*where, "format", "expected a demonstration: prompt + completion (or response), "
                                f"or messages ending in an assistant turn; got keys {sorted(row)[:8]}")
            adapter = DEMO_FORMATS[name]
        prompt, completion = adapter(row, where, allow_empty_completions)
        records.append(UnpairedRecord(prompt, completion, True, *where))
        if max_records and len(records) >= max_records:
            break
    if not records:
        no_records(path)
    return records
