"""The one canonical record that every source format is normalized into."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreferenceRecord", "UnpairedRecord", "Text"]

# A text is either a plain string or a list of chat messages {"role": ..., "content": ...}.
Text = str | list


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: Text    # str, or messages rendered with the chat template (generation prompt added)
    chosen: Text    # str completion, or the assistant message(s) that follow the prompt
    rejected: Text
    source: str     # file the record came from
    line: int       # 1-based line (JSONL/CSV) or record index (JSON/Parquet/HF dir)


@dataclass(frozen=True)
class UnpairedRecord:
    prompt: Text
    completion: Text
    label: bool     # True = desirable (KTO)
    source: str
    line: int
