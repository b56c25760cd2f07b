"""Source files -> validated `PreferenceRecord`s. Streaming, line-numbered, no model needed.

The readers (readers.py) yield (line, row) with 1-based JSONL/CSV line numbers (or record indices
for JSON, Parquet and HF dataset directories). Format adapters here map a row to the canonical
record; every problem is a `DataError` naming path, line and field, raised before any model is
loaded (or, with data.streaming, when the row is reached).
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ..utils.errors import DataError
from ..utils.safeio import atomic_write, check_text
from .readers import (  # noqa: F401 - FILE_KINDS, READERS, STREAM_READERS, hub_*: this module's public names too
    FILE_KINDS,
    READERS,
    STREAM_READERS,
    hub_dataset,
    hub_offline,
    read_jsonl_rows,
    read_rows,
)
from .records import PreferenceRecord, UnpairedRecord

__all__ = ["load_records", "iter_records", "mapped_rows", "no_records", "read_rows", "read_table", "read_jsonl_rows", "text_field", "split_path", "to_unpaired", "is_unpaired_file", "write_jsonl", "messages", "hh_as_messages", "FORMATS", "UNPAIRED_FORMATS", "HH_ASSISTANT", "hub_dataset", "hub_offline"]

HH_ASSISTANT = "\n\nAssistant:"
ROLES = {"system", "user", "assistant", "tool"}
_EMPTY_HINT = "data.allow_empty_completions=true keeps it as an EOS-only completion"


def text_field(file, line: int, row, key: str, *, empty_ok: bool = False) -> str:
    """`row[key]` as a string, or a one-line DataError naming file, line and field."""
    value = row.get(key) if isinstance(row, dict) else None
    if isinstance(row, dict) and key not in row:
        raise DataError(str(file), line, key, missing(row, key))
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise DataError(str(file), line, key, "missing or not a string" if empty_ok
                        else "missing or not a non-empty string")
    return value


def read_table(path: str, *, required: tuple[str, ...] = (), empty_ok: bool = False,
               what: str = "records") -> tuple[Path, list[tuple[int, dict]]]:
    """The one row loader for files that are not preference data (prompts, items to label or
    score): any data format, `file[:N]` slices, every row an object whose `required` fields are
    strings (non-empty unless `empty_ok`), and at least one row. Returns (file, [(line, row)])."""
    file, part = split_path(path)
    rows = list(read_rows(file))[part]
    if not rows:
        raise DataError(str(file), 1, "file", f"no {what}")
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(str(file), line, "record", "expected an object")
        for key in required:
            text_field(file, line, row, key, empty_ok=empty_ok)
    return file, rows


# ---- format adapters: row -> (prompt, chosen, rejected) ------------------------------------

_KNOWN_COLUMNS = {"prompt", "chosen", "rejected", "completion", "response", "label", "messages", "answer", "id"}


def missing(row, key: str) -> str:
    """"missing", with the columns the record does have and the column map that would use one of
    them (`chosen: missing` alone left users guessing which names we expect)."""
    if not isinstance(row, dict) or not row:
        return "missing"
    cols = [str(c) for c in row]
    shown = ", ".join(cols[:10]) + (", ..." if len(cols) > 10 else "")
    free = [c for c in cols if c not in _KNOWN_COLUMNS]  # a column we read already is not the one to map
    near = difflib.get_close_matches(key, free, n=1, cutoff=0.4) or [c for c in free if key in c.lower()][:1]
    source = near[0] if near else "YOUR_COLUMN"
    return f"missing (the record has: {shown}; map a column with data.column_map='{{{source}: {key}}}')"


def _text(row: dict, key: str, where: tuple, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise DataError(*where, key, missing(row, key))
    value = row[key]
    if value is None:
        raise DataError(*where, key, "is null")
    if not isinstance(value, str):
        raise DataError(*where, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        hint = f" ({_EMPTY_HINT})" if key != "prompt" else ""
        raise DataError(*where, key, f"is empty{hint}")
    return check_text(value, *where, key)


def _messages(row: dict, key: str, where: tuple) -> list:
    if key not in row:
        raise DataError(*where, key, missing(row, key))
    value = row[key]
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(*where, key, f"expected a non-empty list of messages, got {got}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(*where, f"{key}[{i}]", f"expected a message object, got {type(msg).__name__}")
        for part in ("role", "content"):
            if not isinstance(msg.get(part), str):
                problem = "missing" if part not in msg else f"expected a string, got {type(msg[part]).__name__}"
                raise DataError(*where, f"{key}[{i}].{part}", problem)
        if msg["role"] not in ROLES:
            raise DataError(*where, f"{key}[{i}].role", f"{msg['role']!r} is not one of {sorted(ROLES)}")
        check_text(msg["content"], *where, f"{key}[{i}].content")
    return value


def _standard(row: dict, where: tuple, allow_empty: bool):
    return (_text(row, "prompt", where), _text(row, "chosen", where, allow_empty=allow_empty),
            _text(row, "rejected", where, allow_empty=allow_empty))


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _hh(row: dict, where: tuple, allow_empty: bool):
    """Prompt = the shared transcript up to and including the last shared "\n\nAssistant:".

    Usually that is the last assistant turn; a few real transcripts diverge earlier (a turn
    missing its "\n\n"), and then the completions carry the remaining turns.
    """
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    cut = chosen.rfind(HH_ASSISTANT, 0, _common_prefix_len(chosen, rejected))
    if cut < 0:
        field = "chosen" if HH_ASSISTANT not in chosen else "rejected"
        raise DataError(*where, field, f"no shared {HH_ASSISTANT.strip()!r} turn to split the transcript at")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    completions = chosen[len(prompt):], rejected[len(prompt):]
    for name, value in zip(("chosen", "rejected"), completions):
        if not value.strip() and not allow_empty:
            raise DataError(*where, name, f"empty final assistant turn ({_EMPTY_HINT})")
    return (prompt, *completions)


def _implicit(row: dict, where: tuple, allow_empty: bool):
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    n = _common_prefix_len(chosen, rejected)
    # back off to a whitespace boundary so both completions start at a word
    while n > 0 and not chosen[n - 1].isspace() and not (n < len(chosen) and chosen[n].isspace()):
        n -= 1
    if n == 0:
        raise DataError(*where, "prompt", "missing, and chosen/rejected share no prefix to use as the prompt")
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    for name, value in (("chosen", c), ("rejected", r)):
        if not value.strip():
            raise DataError(*where, name, "nothing left after the shared prompt")
    return prompt, c, r


def _conversational(row: dict, where: tuple, allow_empty: bool):
    chosen, rejected = _messages(row, "chosen", where), _messages(row, "rejected", where)
    if "prompt" in row:
        prompt = _messages(row, "prompt", where)
    else:  # implicit prompt: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise DataError(*where, "prompt", "missing, and chosen/rejected share no leading messages")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise DataError(*where, f"{name}[0].role", "the completion must start with an assistant message")
        if not any(m["content"].strip() for m in msgs) and not allow_empty:
            raise DataError(*where, name, f"empty completion ({_EMPTY_HINT})")
    return prompt, chosen, rejected


def _qa_prompt(question: str) -> str:
    return f"Q: {question.strip()}\nA:"


def _truthfulqa(row: dict, where: tuple, allow_empty: bool):
    """TruthfulQA CSV: prompt "Q: <Question>\nA:", chosen the Best Answer, rejected the first
    Incorrect Answer (answers in a cell are separated by ";")."""
    question, best = _text(row, "Question", where), _text(row, "Best Answer", where)
    wrong = [a.strip() for a in _text(row, "Incorrect Answers", where).split(";") if a.strip()]
    if not wrong:
        raise DataError(*where, "Incorrect Answers", "no answer in the cell")
    return _qa_prompt(question), " " + best.strip(), " " + wrong[0]


def _label(row: dict, where: tuple) -> bool:
    if "label" not in row:
        raise DataError(*where, "label", missing(row, "label"))
    value = row["label"]
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0"}:
        return value.strip().lower() in {"true", "1"}  # CSV cells are strings
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise DataError(*where, "label", f"expected true/false, got {value!r}")
    return bool(value)


def _unpaired(row: dict, where: tuple, allow_empty: bool):
    return _text(row, "prompt", where), _text(row, "completion", where, allow_empty=allow_empty), _label(row, where)


_TRUTH = re.compile(r"^Q: (?P<q>.*)\nA: (?P<a>.*)\nTrue:$", re.DOTALL)


def _truth_labels(row: dict, where: tuple, allow_empty: bool):
    """TruthfulQA human truth labels: {"prompt": "Q: q\nA: a\nTrue:", "completion": " yes"|" no"}
    -> prompt "Q: q\nA:", completion " a", label (completion == " yes")."""
    match = _TRUTH.match(_text(row, "prompt", where))
    if not match:
        raise DataError(*where, "prompt", "not of the form 'Q: ...\\nA: ...\\nTrue:'")
    verdict = _text(row, "completion", where).strip()
    if verdict not in {"yes", "no"}:
        raise DataError(*where, "completion", f"expected ' yes' or ' no', got {row['completion']!r}")
    return _qa_prompt(match["q"]), " " + match["a"].strip(), verdict == "yes"


FORMATS: dict[str, Callable] = {
    "standard": _standard, "hh": _hh, "implicit": _implicit, "conversational": _conversational,
    "truthfulqa": _truthfulqa,
}
UNPAIRED_FORMATS: dict[str, Callable] = {"unpaired": _unpaired, "truth_labels": _truth_labels}


def _detect(row: dict) -> str:
    if "completion" in row and "label" in row:
        return "unpaired"
    if isinstance(row.get("prompt"), str) and _TRUTH.match(row["prompt"]) and "completion" in row:
        return "truth_labels"
    if "Question" in row and "Best Answer" in row:
        return "truthfulqa"
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        return "conversational"
    if "prompt" in row:
        return "standard"
    if isinstance(row.get("chosen"), str) and HH_ASSISTANT in row["chosen"]:
        return "hh"
    return "implicit"


def _shape(row: dict) -> tuple:
    """What must stay the same across a file: which keys are present, and str vs list."""
    return tuple((k, type(row[k]).__name__) for k in ("prompt", "chosen", "rejected")
                 if k in row and isinstance(row[k], (str, list)))


_SLICE = re.compile(r"^(?P<path>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_path(path: str | Path) -> tuple[Path, slice]:
    """`file.csv[:500]` -> (file.csv, slice(None, 500)), like HF split slicing; a file whose
    literal name ends in brackets is taken as it is."""
    text = str(path)
    match = _SLICE.match(text)
    if match is None or Path(text).exists():
        return Path(text), slice(None)
    to_int = lambda v: int(v) if v else None  # noqa: E731
    return Path(match["path"]), slice(to_int(match["start"]), to_int(match["stop"]))


def load_records(path: str | Path, *, fmt: str = "auto", column_map: dict | None = None,
                 max_records: int = 0, allow_degenerate: bool = False,
                 allow_empty_completions: bool = False, paired: bool = True, field: str = "file",
                 revision: str = "") -> list:
    """Read, validate and normalize a data file into `PreferenceRecord`s (or `UnpairedRecord`s).

    `path` may end in a record slice, `data.csv[:500]`. One format per file (detected from the
    first record unless `fmt` is given): a record of another shape is an error naming its line.
    Paired data given where unpaired is expected, or the reverse, is an error. Text-identical
    chosen/rejected is an error unless `allow_degenerate`; an empty completion is an error
    unless `allow_empty_completions` (real HH-RLHF train has four empty replies among 1,800
    pairs). A file (or slice) with no records is an error. `path` may also be a hub dataset,
    `org/name[:config][:split]` at `revision` (read_rows); `field` is the setting a hub error names.
    """
    records = []
    for record in iter_records(path, fmt=fmt, column_map=column_map, allow_degenerate=allow_degenerate,
                               allow_empty_completions=allow_empty_completions, paired=paired, field=field,
                               revision=revision):
        records.append(record)
        if max_records and len(records) >= max_records:
            break
    if not records:
        no_records(path)
    return records


def iter_records(path: str | Path, *, fmt: str = "auto", column_map: dict | None = None,
                 allow_degenerate: bool = False, allow_empty_completions: bool = False, paired: bool = True,
                 field: str = "file", revision: str = "", streaming: bool = False) -> Iterator:
    """load_records' records one at a time, each validated as it is read (`streaming`: the file
    too, see read_rows): what data.streaming trains from, a bad row failing when it is reached."""
    first_shape, adapter = None, None
    for where, row in mapped_rows(path, column_map=column_map, field=field, revision=revision, streaming=streaming):
        line = where[1]
        if adapter is None:
            name = _detect(row) if fmt == "auto" else fmt
            if (name in UNPAIRED_FORMATS) == paired:
                want = "paired (prompt/chosen/rejected)" if paired else "unpaired (prompt/completion/label)"
                raise DataError(*where, "format", f"this loss needs {want} data, but the file is {name!r} "
                                + ("" if paired else "(data.paired_to_unpaired=true converts pairs)"))
            adapter = FORMATS.get(name) or UNPAIRED_FORMATS[name]
            first_shape, first_line = _shape(row), line
        else:
            here = dict(_shape(row))
            for key, kind in first_shape:
                if key in here and here[key] != kind:
                    raise DataError(*where, key, f"format differs from line {first_line} "
                                    f"({kind} there, {here[key]} here)")
        prompt, first, second = adapter(row, where, allow_empty_completions)
        if not paired:
            yield UnpairedRecord(prompt, first, second, str(path), line)
        elif first == second and not allow_degenerate:
            raise DataError(*where, "rejected", "identical to chosen (a pair that teaches nothing; "
                            "data.allow_degenerate=true keeps it)")
        else:
            yield PreferenceRecord(prompt, first, second, str(path), line)


def mapped_rows(path: str | Path, *, column_map: dict | None = None, field: str = "file",
                revision: str = "", streaming: bool = False) -> Iterator[tuple]:
    """((file, line), row) for every record of `path` (a file, a `file[a:b]` slice or a hub id,
    see read_rows), each an object with its columns renamed by `column_map`; anything else is an
    error naming its line. What every record loader (preferences here, demonstrations in demos.py)
    reads through. `streaming`: read lazily, a slice too (one counted from the end is refused)."""
    file, part = split_path(path)
    column_map = column_map or {}
    rows = read_rows(file, field=field, revision=revision, streaming=streaming)
    if part != slice(None) and streaming:
        if any(x is not None and x < 0 for x in (part.start, part.stop)):
            raise DataError(str(file), 0, "data.streaming", f"a slice counted from the end ({path}) needs the "
                            "whole file first; use [start:stop] with counts from the start")
        rows = itertools.islice(rows, part.start, part.stop)
    elif part != slice(None):
        rows = list(rows)[part]
    for line, row in rows:
        where = (str(file), line)
        if not isinstance(row, dict):
            raise DataError(*where, "record", f"expected an object, got {type(row).__name__}")
        yield where, {column_map.get(k, k): v for k, v in row.items()}


def no_records(path: str | Path) -> None:
    """The error for a file (or slice) without a single record."""
    file, part = split_path(path)
    raise DataError(file, 1, "file", "no records" + ("" if part == slice(None) else " in the slice"))


def is_unpaired_file(path: str | Path, *, fmt: str = "auto", column_map: dict | None = None) -> bool:
    """True when the file's first record is unpaired (prompt/completion/label) data."""
    if fmt != "auto":
        return fmt in UNPAIRED_FORMATS
    file, _ = split_path(path)
    for _, row in read_rows(file):
        if isinstance(row, dict):
            return _detect({(column_map or {}).get(k, k): v for k, v in row.items()}) in UNPAIRED_FORMATS
        return False
    return False


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL to a temp file beside `path`, then rename: never a half-written file."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_as_messages(records: list) -> list:
    """HH transcripts as chat: the prompt's "\n\nHuman:"/"\n\nAssistant:" turns become user and
    assistant messages (its final empty "Assistant:" is the generation prompt), each completion
    one assistant message, so the model's chat template renders them (`data.hh_as_chat`)."""
    out = []
    for r in records:
        parts = _TURN.split(r.prompt)
        turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                 for who, text in zip(parts[1::2], parts[2::2])]
        if not turns or turns[-1]["role"] != "assistant" or turns[-1]["content"]:
            raise DataError(r.source, r.line, "prompt", "not an HH transcript ending in an open Assistant turn")
        sides = [[{"role": "assistant", "content": c.strip()}] for c in (r.chosen, r.rejected)]
        out.append(PreferenceRecord(turns[:-1], *sides, r.source, r.line))
    return out


messages = _messages  # public: online prompt files validate message lists the same way


def to_unpaired(records: list[PreferenceRecord]) -> list[UnpairedRecord]:
    """Each pair becomes (prompt, chosen, desirable) and (prompt, rejected, undesirable)."""
    return [UnpairedRecord(r.prompt, c, label, r.source, r.line)
            for r in records for c, label in ((r.chosen, True), (r.rejected, False))]
