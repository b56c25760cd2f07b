"""Which C allocator holds the activations: jemalloc when it is installed, else glibc with a fixed
mmap threshold; PREFTUNE_MALLOC chooses.

glibc serves a request above its mmap threshold with its own mapping, returned to the system on
free, and anything below it from heap arenas, which give memory back only from their top. The
threshold starts at 128 KiB but rises to the size of each mapped block that is freed, up to 32 MiB
(glibc's dynamic threshold): after the first step nearly every activation tensor is carved out of
the arenas, and a step's freed tensors leave holes that later allocations do not always fit. The
process keeps them, and peak RSS grows faster than the tensors it holds.

Measured (python -m benchmarks.scaling --allocators: the block worker, SmolLM2-135M, LoRA, batch 4,
no checkpointing, 2 steps, 2-core EPYC; peak RSS, training seconds; allocators.json):

    tokens/pair   glibc defaults     jemalloc           threshold 4 MiB    threshold 64 KiB
    256           3.26 GB  15.0 s    2.38 GB  13.7 s    3.12 GB  14.6 s    2.31 GB  21.4 s
    1024          9.61 GB  59.1 s    6.00 GB  (busy)    -                  5.96 GB  81.6 s
    2048          16.9 GB   184 s    10.8 GB   191 s    11.1 GB   192 s    10.7 GB   182 s

jemalloc takes the small peak and kept glibc's speed at 256 and 2048 tokens (at 1024 a quiet
rerun took 82 s against glibc's 59 s, one run each: not understood yet). A threshold fixed at 64 KiB gets the same
peak but faults fresh pages in at every allocation above it (1.4x the time at 256-1024 tokens);
fixed at 4 MiB, only the large activation tensors are mapped one by one: most of the saving at
2048 tokens, no measurable cost at 256. With gradient checkpointing jemalloc costs time: 110 s
against glibc's 76 s at 1024 tokens (1.72 against 4.10 GB; allocators-gc1024.json), not understood
yet; PREFTUNE_MALLOC=system keeps glibc. So:

* `auto` (default): the `preftune` command relaunches itself once with jemalloc in LD_PRELOAD when
  the library is installed (Debian/Ubuntu: `apt install libjemalloc2`), before it loads anything;
  without it, `release`. Library users of `train()` get jemalloc by starting Python with
  LD_PRELOAD themselves, and `release` otherwise.
* `release`: glibc with its mmap threshold fixed at 4 MiB (mallopt: no relaunch, no package).
* `system`: glibc's defaults.

A user's own LD_PRELOAD of an allocator, or MALLOC_MMAP_THRESHOLD_, is kept as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

from .envvars import env

__all__ = ["MMAP_THRESHOLD", "JEMALLOC_PATHS", "jemalloc_path", "preload_env", "relaunch_with_jemalloc",
           "release_freed_memory"]

MMAP_THRESHOLD = 4 << 20  # bytes: `release` maps and unmaps blocks from this size up one by one
_M_MMAP_THRESHOLD = -3      # mallopt's parameter number in glibc's malloc.h
# where Debian, Ubuntu, Fedora and source builds put it
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_GUARD = "PREFTUNE_MALLOC_RELAUNCHED"  # set in the relaunched process: never relaunch twice
_done: str | None = None


def jemalloc_path() -> str | None:
    return next((p for p in JEMALLOC_PATHS if Path(p).is_file()), None)


def _kept(environ) -> str | None:
    """Why the allocator is left as the user set it up, or None."""
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return "MALLOC_MMAP_THRESHOLD_ is set"
    return None


def preload_env(environ) -> dict | None:
    """`environ` with jemalloc first in LD_PRELOAD, for a process started from it; None when
    PREFTUNE_MALLOC is not `auto`, the library is absent, this is not Linux, the user chose an
    allocator, or this process is the relaunched one."""
    if env("PREFTUNE_MALLOC") != "auto" or platform.system() != "Linux" or environ.get(_GUARD) \
            or _kept(environ):
        return None
    lib = jemalloc_path()
    if lib is None:
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{lib}:{preload}" if preload else lib, _GUARD: "1"}


def relaunch_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `python -m preftune ARGV` under jemalloc (same PID, stdin, exit
    code); returns when there is nothing to do (preload_env is None)."""
    new = preload_env(os.environ)
    if new is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "preftune", *argv], new)


def release_freed_memory() -> str:
    """Fix glibc's mmap threshold unless jemalloc (or the user's allocator) runs this process or
    PREFTUNE_MALLOC=system (once per process); says which allocator it runs on, for summary.json."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _loaded_allocator() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name in _ALLOCATORS if f"lib{name}" in maps), None)


def _apply() -> str:
    loaded = _loaded_allocator()
    if loaded:
        return loaded
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's own"
    choice, kept = env("PREFTUNE_MALLOC"), _kept(os.environ)
    if kept or choice == "system":
        return f"glibc ({kept})" if kept else "glibc defaults"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "glibc defaults (mallopt not found)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "glibc defaults (mallopt refused)"
    return f"glibc, mmap threshold {MMAP_THRESHOLD}"
