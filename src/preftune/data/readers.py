"""Data files -> (line, row): the readers of every file kind, a saved dataset dir and a hub dataset.

Readers yield (line, row) with 1-based JSONL/CSV line numbers (or record indices for JSON,
Parquet and HF dataset directories); every problem (a missing file, bad bytes, a corrupt archive,
a file past PREFTUNE_MAX_FILE_BYTES) is a one-line `DataError` naming path, line and field. With
`streaming` (data.streaming) files are read as rows are asked for and never held whole.
Split from sources.py, which maps rows to records (the format adapters).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..utils.errors import DataError
from ..utils.safeio import loads_json, max_file_bytes, open_regular, os_problem, read_capped

__all__ = ["read_rows", "read_jsonl_rows", "hub_dataset", "hub_offline", "READERS", "STREAM_READERS", "FILE_KINDS",
           "MAX_LINE_BYTES"]


MAX_LINE_BYTES = 16 * 1024 * 1024  # a record larger than this is refused, never read whole


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
    """CSV rows decoded line by line as they are read (data.streaming): no whole-file read, no size
    cap, and a bad byte or a broken archive is named at its own line."""
    def text() -> Iterator[str]:
        for lineno, raw in _lines(path, capped=False):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, lineno, "encoding", f"not UTF-8 (byte {err.start})") from None
            yield line.removeprefix("\ufeff") if lineno == 1 else line

    yield from _csv_rows(path, text())


def _csv_rows(path: Path, text) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # an oversized field, a NUL byte, a bad quote
            raise DataError(path, reader.line_num + 1, "csv", str(err)) from None  # the record being read
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
