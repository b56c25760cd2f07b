"""Bounded, regular-file-only reading of everything a user hands us (layer 0: no model, no config).

Every reader here turns what a hostile or broken input can raise into one `DataError`
(`path:line: field: problem`), so callers never see an OSError, a decoder exception or a
RecursionError from a file:

- only regular files are opened (a FIFO, a character device or a directory is refused at once;
  the open itself is non-blocking, so a FIFO with no writer cannot hang us);
- whole-file reads are capped (`PREFTUNE_MAX_FILE_BYTES`, default 1 GiB), line reads by the caller;
- JSON: duplicate object keys, NaN/Infinity literals, integers too long for Python's digit
  limit and nesting deeper than `MAX_JSON_DEPTH` are errors, not silent choices;
- YAML: `yaml.SafeLoader` only, duplicate keys refused, aliases allowed but their expanded size
  capped and recursive aliases refused (a "billion laughs" document is one line, not a hang).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from .envvars import env
from .errors import ConfigError, DataError

__all__ = ["atomic_path", "atomic_write", "check_output", "read_json", "write_json", "MAX_JSON_DEPTH", "max_file_bytes", "open_regular", "read_capped", "loads_json", "load_yaml",
           "os_problem", "check_text"]

MAX_JSON_DEPTH = 64          # nesting of any JSON/YAML value we read (records, configs, run files)
MAX_YAML_NODES = 100_000     # nodes after alias expansion


def max_file_bytes() -> int:
    """The whole-file cap; `PREFTUNE_MAX_FILE_BYTES` overrides it (a positive integer; anything
    else is one line naming the variable, envvars.py)."""
    return env("PREFTUNE_MAX_FILE_BYTES")


def os_problem(err: OSError) -> str:
    """A short, stable description of an OSError (no traceback, no repr)."""
    names = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory",
             errno.ENOENT: "no such file or directory", errno.ELOOP: "too many levels of symbolic links"}
    return names.get(err.errno, err.strerror or type(err).__name__).lower()


def open_regular(path: str | Path, *, field: str = "file", follow_symlinks: bool = True):
    """Open `path` for binary reading if it is a regular file; anything else is one DataError.
    `follow_symlinks=False`: a symlink is refused too (files we embed or copy onward: a link planted
    in a run directory must not carry its target into a report or an export)."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags if follow_symlinks else flags | os.O_NOFOLLOW)
    except OSError as err:
        if not follow_symlinks and err.errno == errno.ELOOP:
            raise DataError(path, 0, field, "is a symlink; only regular files are read here") from None
        raise DataError(path, 0, field, os_problem(err)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise DataError(path, 0, field, f"is {kind}; expected a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_capped(path: str | Path, *, field: str = "file", cap: int | None = None,
                follow_symlinks: bool = True) -> bytes:
    """The whole file, if it is regular and at most `cap` bytes (default `max_file_bytes()`)."""
    cap = cap or max_file_bytes()
    with open_regular(path, field=field, follow_symlinks=follow_symlinks) as fh:
        try:
            data = fh.read(cap + 1)
        except OSError as err:
            raise DataError(path, 0, field, os_problem(err)) from None
    if len(data) > cap:
        raise DataError(path, 0, field, f"larger than {cap} bytes (PREFTUNE_MAX_FILE_BYTES raises the cap)")
    return data


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value, limit: int) -> int:
    """Nesting depth, stopping as soon as it passes `limit` (iterative: no recursion to exhaust)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_json(text: str | bytes, path: str | Path, line: int = 1, *, field: str = "json"):
    """Strict JSON: the value, or a DataError naming path, line and what is wrong."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise DataError(path, line + err.lineno - 1, field, f"invalid JSON: {err.msg} at column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise DataError(path, line, "encoding", f"not UTF-8 (byte {err.start})") from None
    except RecursionError:
        raise DataError(path, line, field, f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # duplicate keys, NaN/Infinity, integers past the digit limit
        raise DataError(path, line, field, str(err).splitlines()[0]) from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise DataError(path, line, field, f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: str | Path, *, field: str | None = None):
    """A JSON file we or the user wrote (a run's summary.json, reference.json, a manifest): regular
    files only, not followed through a symlink (a FIFO there is one line, not a hang; a link planted
    in a run directory is not read through), capped, strict; a DataError otherwise."""
    path = Path(path)
    field = field or path.name
    return loads_json(read_capped(path, field=field, follow_symlinks=False), path, field=field)


def write_json(result, out: str | Path | None) -> str:
    """`result` as indented JSON text, also written atomically to `out` when one is given."""
    text = json.dumps(result, indent=2)
    if out:
        atomic_write(Path(out), text + "\n")
    return text


def check_text(value: str, path: str | Path, line: int, field: str) -> str:
    """A string that cannot be encoded (a lone surrogate from a JSON escape) is refused here,
    where its line is known, instead of crashing the tokenizer later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(path, line, field, f"contains an unpaired surrogate at character {err.start}") from None
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds alias expansion."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict, set)):  # `? [a, b]`: SafeLoader's own check comes too late for `in`
                raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} used as a key",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """Nodes after alias expansion (shared nodes counted each time they are used); a node that
    contains itself raises ValueError. Memoised, so a bomb is measured without being built."""
    sizes, on_path = {}, set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise ValueError("a recursive alias (a node that contains itself)")
        on_path.add(key)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1 + sum(size(c) for c in children)
        on_path.discard(key)
        sizes[key] = min(total, MAX_YAML_NODES + 1)
        return sizes[key]

    return size(root)


def load_yaml(path: str | Path, *, field: str = "<yaml>", follow_symlinks: bool = True):
    """A YAML file's value (SafeLoader), or a DataError naming the file and line."""
    raw = read_capped(path, field="<file>", follow_symlinks=follow_symlinks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, 1, "encoding", f"not UTF-8 (byte {err.start})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise DataError(path, 1, field, f"aliases expand to more than {MAX_YAML_NODES} nodes")
        if _depth_nodes(node) > MAX_JSON_DEPTH:
            raise DataError(path, 1, field, f"nested deeper than {MAX_JSON_DEPTH} levels")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else 1, field,
                        f"invalid YAML: {getattr(err, 'problem', None) or err}") from None
    except (ValueError, RecursionError) as err:
        raise DataError(path, 1, field, f"invalid YAML: {err}") from None
    finally:
        loader.dispose()


def _depth_nodes(root) -> int:
    stack, deepest = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        if isinstance(node, yaml.SequenceNode):
            stack.extend((n, depth + 1) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((v, depth + 1) for _, v in node.value)
    return deepest


# ---- writing: whole or not at all ----------------------------------------------------------

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output(path: str | Path, field: str = "--out") -> Path:
    """The one output rule of every verb: an output flag names a file. An existing directory there
    (or a symlink to one) is refused, since writing "there" used to mean deleting it; an existing
    file, or a symlink, is replaced whole in one rename (atomic_path), the link itself, never its
    target. Call it before any work, so a long eval does not end in the refusal."""
    path = Path(path)
    _refuse_directory(path, False, False, field)  # the rule atomic_path applies again when it writes
    return path


@contextmanager
def atomic_path(dest: str | Path, *, directory: bool = False, replace_dir: bool = False,
                field: str = "output") -> Iterator[Path]:
    """A temp path beside `dest` (`.tmp-<pid>-<name>`, an empty directory if asked) to write into;
    when the block ends normally it takes `dest`'s place in one rename, and when it raises the temp
    path is deleted. Readers never see a half-written file or directory at `dest`. The one
    write-then-rename helper of the package.

    What may stand at `dest`: nothing, a file or a symlink (replaced, never followed), an empty
    directory when writing a directory, and a non-empty directory only with `replace_dir` (a
    directory the caller owns: a run's model/, a checkpoint, a conversion cache, an export the user
    asked to overwrite). Anything else is a ConfigError naming `dest` and `field` before any writing."""
    dest = Path(dest)
    _refuse_directory(dest, directory, replace_dir, field)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        _remove(tmp)
        problem = _write_problem(err)
        if problem:  # disk full inside safetensors or torch was exit 1 with no file named
            raise ConfigError(str(dest), field, f"not written: {problem}") from None
        raise
    _refuse_directory(dest, directory, replace_dir, field)  # nothing appeared there while we wrote
    _shareable(tmp)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest) if replace_dir else dest.rmdir()
    os.replace(tmp, dest)


_WRITE_FAILURES = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
                   "read-only file system": errno.EROFS, "file too large": errno.EFBIG}


def _write_problem(err: BaseException) -> str | None:
    """What the file system said, for a write that failed because of it: an OSError, or a library's
    own error carrying the OS's words (safetensors and torch wrap ENOSPC in their exceptions)."""
    if isinstance(err, OSError) and err.errno in (*_WRITE_FAILURES.values(), errno.EACCES, errno.EIO):
        return os_problem(err)
    text = str(err).lower()
    for words, code in _WRITE_FAILURES.items():
        if isinstance(err, Exception) and words in text:
            return os_problem(OSError(code, words))
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _shareable(root: Path) -> None:
    """Files as the user's umask makes them (0644 under the usual 022), not 0600: libraries that
    write through a private temp file (safetensors, huggingface_hub) left a run's weights readable
    by their owner only, so a model folder could not be shared or served by another account."""
    mode = 0o666 & ~_umask()
    for path in [root, *(root.rglob("*") if root.is_dir() and not root.is_symlink() else ())]:
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


def _refuse_directory(dest: Path, directory: bool, replace_dir: bool, field: str) -> None:
    if not dest.is_dir():
        return
    if not directory:
        raise ConfigError(str(dest), field, "is an existing directory; name a file to write (nothing was "
                          "written or deleted)")
    if dest.is_symlink():
        raise ConfigError(str(dest), field, "is a symlink to a directory; name a new directory")
    if not replace_dir and any(dest.iterdir()):
        raise ConfigError(str(dest), field, "already exists and is not empty; choose a new directory")


def atomic_write(dest: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `dest` whole or not at all (see atomic_path)."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(dest)
