"""Source files -> validated `PreferenceRecord`s. Streaming, line-numbered, no model needed.

Readers yield (line, row) with 1-based JSONL/CSV line numbers (or record indices for JSON,
Parquet and HF dataset directories). Format adapters map a row to the canonical record; every
problem is a `DataError` naming path, line and field, raised before any model is loaded.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from ..utils.errors import DataError
from ..utils.safeio import (
    atomic_write,
    check_text,
    loads_json,
    max_file_bytes,
    open_regular,
    os_problem,
    read_capped,
)
from .records import PreferenceRecord, UnpairedRecord

__all__ = ["load_records", "iter_records", "mapped_rows", "no_records", "read_rows", "read_table", "read_jsonl_rows", "text_field", "split_path", "to_unpaired", "is_unpaired_file", "write_jsonl", "messages", "hh_as_messages", "FORMATS", "UNPAIRED_FORMATS", "HH_ASSISTANT", "hub_dataset", "hub_offline"]

MAX_LINE_BYTES = 16 * 1024 * 1024  # a record larger than this is refused, never read whole
HH_ASSISTANT = "\n\nAssistant:"
ROLES = {"system", "user", "assistant", "tool"}
_EMPTY_HINT = "data.allow_empty_completions=true keeps it as an EOS-only completion"


def _open_binary(path: Path):
    fh = open_regular(path)
    return gzip.GzipFile(fileobj=fh, mode="rb") if path.suffix == ".gz" else fh


def _lines(path: Path, capped: bool = True) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) with decompression and OS failures turned into one DataError. A
    compressed file is capped on what it expands to (PREFTUNE_MAX_FILE_BYTES), not on what it
    weighs: a 205 KB .json.gz of 200 MB, or a .jsonl.gz of endless blank lines, used to run on.
    `capped=False` (data.streaming: memory is bounded by the buffer, not the file) lifts the cap."""
    lineno, expanded, cap = 0, 0, max_file_bytes() if path.suffix == ".gz" and capped else None
    with _open_binary(path) as fh:
        while True:
            try:
                raw = fh.readline(MAX_LINE_BYTES + 1)
            except (gzip.BadGzipFile, zlib.error, EOFError) as err:
                problem = "truncated" if isinstance(err, EOFError) else f"corrupt ({err})"
                raise DataError(path, lineno + 1, "gzip", f"compressed stream is {problem}") from None
            except OSError as err:
                raise DataError(path, lineno + 1, "file", os_problem(err)) from None
            if not raw:
                return
            lineno += 1
            expanded += len(raw)
            if cap is not None and expanded > cap:
                raise DataError(path, lineno, "gzip", f"expands past {cap} bytes (PREFTUNE_MAX_FILE_BYTES raises "
                                "the cap)")
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(path, lineno, "line", f"longer than {MAX_LINE_BYTES} bytes")
            yield lineno, raw


def _read_jsonl(path: Path, capped: bool = True) -> Iterator[tuple[int, dict]]:
    for lineno, raw in _lines(path, capped):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, lineno, "encoding", f"not UTF-8 (byte {err.start})") from None
        if not text.strip():
            continue
        yield lineno, loads_json(text.rstrip("\r\n"), path, lineno)


def _read_whole(path: Path, encoding: str) -> str:
    if path.suffix == ".gz":
        return b"".join(raw for _, raw in _lines(path)).decode(encoding)
    return read_capped(path).decode(encoding)


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        text = _read_whole(path, "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, 1, "encoding", f"not UTF-8 (byte {err.start})") from None
    data = loads_json(text, path)
    if not isinstance(data, list):
        raise DataError(path, 1, "json", "expected a list of records")
    yield from enumerate(data, start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        text = _read_whole(path, "utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, 1, "encoding", f"not UTF-8 (byte {err.start})") from None
    yield from _csv_rows(path, io.StringIO(text, newline=""))


def _stream_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """CSV rows decoded as they are read (data.streaming): no whole-file read, no size cap."""
    with _open_binary(path) as fh:
        yield from _csv_rows(path, io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""))


def _csv_rows(path: Path, text) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # an oversized field, a NUL byte, a bad quote
            raise DataError(path, reader.line_num + 1, "csv", str(err)) from None  # the record being read
        except UnicodeDecodeError:  # streamed: decoded as read
            raise DataError(path, reader.line_num + 1, "encoding", "not UTF-8") from None
        except (gzip.BadGzipFile, zlib.error, EOFError) as err:
            problem = "truncated" if isinstance(err, EOFError) else f"corrupt ({err})"
            raise DataError(path, reader.line_num + 1, "gzip", f"compressed stream is {problem}") from None
        if None in row:
            raise DataError(path, reader.line_num, "csv", f"{len(row[None])} more cells than the header has columns")
        yield reader.line_num, row


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a Parquet file, capped on what they expand to (PREFTUNE_MAX_FILE_BYTES): columnar
    encoding let a 13 KB file hold 100 MB of text (one value, dictionary-encoded and repeated).
    Text columns are read as dictionaries, and each batch's decoded size is counted from them
    before any row is built."""
    import pyarrow as pa  # optional: only Parquet input needs it
    import pyarrow.compute as pc  # optional, as above
    import pyarrow.parquet as pq  # optional, as above

    cap, expanded = max_file_bytes(), 0
    try:
        with open_regular(path, field="parquet") as fh:  # a FIFO or device: one line, not a hang
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            stored = sum(meta.row_group(g).column(c).total_uncompressed_size
                         for g in range(meta.num_row_groups) for c in range(meta.num_columns))
            if stored > cap:
                raise DataError(path, 1, "parquet", f"decompresses to {stored} bytes, past {cap} "
                                "(PREFTUNE_MAX_FILE_BYTES raises the cap)")
            text = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_binary(f.type)
                    or pa.types.is_large_string(f.type)]
            fh.seek(0)
            table = pq.ParquetFile(fh, read_dictionary=text).read()
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(path, 1, "parquet", f"unreadable: {str(err).splitlines()[0]}") from None
    line = 0
    for batch in table.to_batches(max_chunksize=256):
        for col in batch.columns:
            if pa.types.is_dictionary(col.type):
                lengths = pc.binary_length(col.dictionary)
                expanded += pc.sum(pc.take(lengths, col.indices)).as_py() or 0
            else:
                expanded += col.nbytes
        if expanded > cap:
            raise DataError(path, line + 1, "parquet", f"expands past {cap} bytes ({meta.num_rows} rows x "
                            f"{meta.num_columns} columns; PREFTUNE_MAX_FILE_BYTES raises the cap)")
        for row in batch.to_pylist():
            line += 1
            yield line, row


def _stream_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """Parquet rows 256 at a time (data.streaming): pyarrow decodes one row group's pages at a
    time, so memory follows the row-group size, not the file's; no size cap."""
    import pyarrow.parquet as pq  # optional: only Parquet input needs it

    line = 0
    with open_regular(path, field="parquet") as fh:  # a FIFO or device: one line, not a hang
        try:
            batches = pq.ParquetFile(fh).iter_batches(batch_size=256)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                for row in batch.to_pylist():
                    line += 1
                    yield line, row
        except DataError:
            raise
        except Exception as err:  # pyarrow raises several types for a corrupt file or page
            raise DataError(path, line + 1, "parquet", f"unreadable: {str(err).splitlines()[0]}") from None


def _read_hf_dir(path: Path, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict read as DIR:SPLIT (or DIR alone when it
    holds one split)."""
    import datasets  # optional: only saved HF dataset dirs need it

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(path, 1, "dataset", f"not a saved HF dataset: {str(err).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            wanted = f"has no split {split!r}" if split else "holds several splits"
            raise DataError(path, 1, "dataset", f"{wanted}: {', '.join(ds)}; name one as {path}:SPLIT")
        ds = ds[split]
    elif split is not None:
        raise DataError(path, 1, "dataset", f"is one Dataset, not a DatasetDict with splits; drop ':{split}'")
    yield from enumerate(ds, start=1)


_HUB_ID = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<a>[\w.-]+))?(?::(?P<b>[\w.-]+))?$")
# the file readers by suffix (a suffix may also end in .gz): the one list the reader, the hub-id
# check, the error messages and the config's help text read
READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
# data.streaming: the same suffixes read lazily (None: cannot be, said in one line)
STREAM_READERS = {".jsonl": lambda p: _read_jsonl(p, capped=False), ".json": None, ".csv": _stream_csv,
                  ".parquet": _stream_parquet}
FILE_KINDS = ", ".join(f"{s}[.gz]" if s == ".jsonl" else s for s in READERS)
_DATA_SUFFIXES = (*READERS, ".gz")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_dataset(path: str | Path) -> tuple[str, str, str | None] | None:
    """(dataset id, split, config) when `path` is a hub dataset, `org/name`, `org/name:split` or
    `org/name:config:split` (split train by default, the dataset's default config), and not a local
    path: nothing by that name exists, its first part is not a local directory and it has no
    data-file extension (a mistyped `data/x.jsonl` stays a missing file)."""
    text = str(path)
    match = _HUB_ID.match(text)
    if match is None or Path(text).exists() or Path(text.split("/")[0]).exists() \
            or match["name"].lower().endswith(_DATA_SUFFIXES):
        return None
    if match["b"]:
        return match["name"], match["b"], match["a"]
    return match["name"], match["a"] or "train", None


def _read_hub(path: str, name: str, split: str, config: str | None, field: str,
              revision: str = "") -> Iterator[tuple[int, dict]]:
    """Rows of a hub dataset split (record indices as lines), at `revision` (data.revision) when
    given; offline or unreachable: one DataError."""
    what = f"{name!r} (" + ", ".join(x for x in (f"config {config!r}" if config else "", f"split {split!r}",
                                                 f"revision {revision!r}" if revision else "") if x) + ")"
    if hub_offline():
        raise DataError(path, 0, field, f"not a local file, and HF_HUB_OFFLINE is set, so the hub dataset {what} "
                        "is not fetched; unset it, or save the data locally and point at the file")
    import datasets  # optional: only hub datasets (and saved dataset dirs) need it

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision or None)
    except Exception as err:  # noqa: BLE001 - network, unknown repo, config or split, gated: one line each
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DataError(path, 0, field, f"not a local file, and the hub dataset {what} cannot be loaded: "
                        f"{detail}") from None
    return enumerate(ds, start=1)


def read_jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, value) of a JSON Lines file whatever its name (an append-only log): regular files
    only, strict JSON, bounded lines."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, 0, "file", "no such file or directory")
    open_regular(path).close()
    return _read_jsonl(path)


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


def read_rows(path: str | Path, *, field: str = "file", revision: str = "",
              streaming: bool = False) -> Iterator[tuple[int, dict]]:
    """(line, row) of a local data file or dataset dir, or of a hub dataset (`org/name[:split]`,
    see hub_dataset); `field` is the setting a hub error names (e.g. data.train_path).
    `streaming` (data.streaming): files are read as rows are asked for, never whole and with no
    size cap (STREAM_READERS); a JSON list, which must be parsed whole, is refused. Dataset dirs and
    hub datasets are memory-mapped Arrow, read row by row either way."""
    if (hub := hub_dataset(path)) is not None:
        return _read_hub(str(path), *hub, field, revision)
    path = Path(path)
    base, colon, split = str(path).rpartition(":")
    if not path.exists() and colon and split and Path(base).is_dir():  # DIR:SPLIT of a saved DatasetDict
        return _read_hf_dir(Path(base), split)
    if not path.exists():
        raise DataError(path, 0, "file", "no such file or directory" if not path.is_symlink() else "a dangling symlink")
    if path.is_dir():
        return _read_hf_dir(path)
    open_regular(path).close()  # a FIFO, a device or an unreadable file: one line, before any reading
    name = path.name.removesuffix(".gz")
    for suffix, reader in (STREAM_READERS if streaming else READERS).items():
        if name.endswith(suffix):
            if reader is None:
                raise DataError(path, 0, "data.streaming", f"a {suffix} file is one JSON list, parsed whole; "
                                "write it as .jsonl (one record per line) to stream it")
            return reader(path)
    raise DataError(path, 0, "file", f"unknown extension; use {FILE_KINDS} or a dataset dir")


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
