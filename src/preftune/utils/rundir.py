"""One writer per run directory, whole-directory replacement, and reading what a run appended.

- `RunLock`: an exclusive `fcntl.flock` on `<run>/.preftune.lock`, holding the writer's pid, host,
  start time and command. A second writer gets one line naming the holder and exits 2 having
  changed nothing. The kernel drops the lock with the process, so a SIGKILLed run leaves at worst
  a stale file that the next writer simply takes over.
- `run.overwrite=true` moves the old directory aside (same parent, hidden name) before the new
  run starts and deletes it afterwards: no checkpoint, eval or report of the old run survives
  into the new one, and a live run's directory is never replaced.
- `finished(run_dir)`: a run whose summary.json parses has finished; `resume` refuses it.
- `read_jsonl_tail_tolerant`: a torn last line (the writer was killed mid-write) is dropped with
  a warning; a malformed earlier line is a one-line error naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

from .errors import ConfigError, DataError
from .safeio import os_problem, read_capped, read_json

__all__ = ["RunLock", "finished", "read_jsonl_tail_tolerant", "LOCK_NAME"]

LOCK_NAME = ".preftune.lock"


def _holder(path: Path) -> str:
    try:
        info = read_json(path)
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (DataError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path):
    """An open, exclusively locked file object, or None when someone else holds it. The lock file is
    never followed or opened if it is not a regular file: a symlink planted there would have had
    us truncate its target, a FIFO would have hung us."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(str(path), LOCK_NAME, f"cannot be used as the run's lock file ({os_problem(err)}; "
                          "a symlink is refused): remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(str(path), LOCK_NAME, "is not a regular file: remove it")
    os.set_blocking(fd, True)
    fh = os.fdopen(fd, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


class RunLock:
    """Held for the whole run by the process that writes `run_dir` (the main process)."""

    def __init__(self, run_dir: Path, *, overwrite: bool, resume: bool):
        self.run_dir, self.fh, self._aside = Path(run_dir), None, None
        self._created = not self.run_dir.exists()
        self._acquire(overwrite, resume)

    def _busy(self, where: Path) -> ConfigError:
        return ConfigError(str(self.run_dir), "run.output_dir", f"in use by {_holder(where)} "
                           "(one writer per run directory; wait for it or choose another directory)")

    def _acquire(self, overwrite: bool, resume: bool) -> None:
        d = self.run_dir
        if self._created:
            d.mkdir(parents=True)
        lock = d / LOCK_NAME
        fh = _try_lock(lock)
        if fh is None:
            raise self._busy(lock)
        others = [p for p in d.iterdir() if p.name != LOCK_NAME]
        if not resume and others and not overwrite:
            self._give_up(fh)
            raise ConfigError(str(d), "run.output_dir", "already exists and is not empty "
                              "(set run.overwrite=true or choose another directory)")
        if not resume and others:  # overwrite: the old run goes aside whole, under our lock
            self._aside = d.with_name(f".{d.name}.old-{os.getpid()}-{int(time.time())}")
            os.replace(d, self._aside)
            d.mkdir()
            fh.close()  # it locked the file that moved aside with the old run
            fh = _try_lock(d / LOCK_NAME)
        self.fh = fh
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:]}))
        fh.flush()

    def _give_up(self, fh) -> None:
        """Leave the directory as we found it: our lock file (and a directory we made) go."""
        (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        fh.close()
        if self._created:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def started(self) -> None:
        """The new run owns the directory now: the old one that was moved aside can go."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def release(self, *, ok: bool = True) -> None:
        if self.fh is None:
            return
        if not ok and self._aside is not None:  # failed before it began: put the old run back
            shutil.rmtree(self.run_dir, ignore_errors=True)
            os.replace(self._aside, self.run_dir)
            self._aside = None
        (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        self.fh.close()
        self.fh = None
        self.started()


def finished(run_dir: Path) -> dict | None:
    """The summary of a run that finished (summary.json is written last and parses), else None."""
    path = Path(run_dir) / "summary.json"
    if not os.path.lexists(path):
        return None
    raw = read_capped(path, field="summary.json", follow_symlinks=False)  # a FIFO, device or link: one line
    try:
        summary = json.loads(raw)
    except ValueError:  # torn or never finished writing: not finished
        return None
    return summary if isinstance(summary, dict) and "steps" in summary else None


def read_jsonl_tail_tolerant(path: Path, warn=print) -> list[dict]:
    """Rows of an append-only JSONL; a torn last line is dropped (with a warning), any other
    malformed line is a DataError naming it."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as err:
            if all(not rest.strip() for rest in lines[i:]):  # the last line: torn by a kill mid-write
                warn(f"{path}:{i}: dropping a torn last line ({len(raw)} bytes)")
                break
            raise DataError(path, i, "json", f"malformed line in the middle of the file ({err})") from None
        rows.append(row)
    return rows
