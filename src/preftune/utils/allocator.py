"""Which C allocator holds the activations: jemalloc when it is installed, else glibc with a fixed
mmap threshold; PREFTUNE_MALLOC chooses (`fast`: jemalloc keeping freed pages).

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

jemalloc takes the small peak and kept glibc's speed at 256 and 2048 tokens, but not at 1024, and
with gradient checkpointing it cost 1.35-1.45x the time. The cause (perf, /usr/bin/time; 1024
tokens, 2 steps, quiet, 2026-12-07): jemalloc hands freed pages back to the system and the next
step's activations fault them in and zero them again, 24-29 million page faults against glibc's
4-5 million, a quarter of the CPU in the kernel. A longer decay time does not help (decay returns
pages gradually, not after the time), nor does oversize_threshold:0; MALLOC_CONF=NO_PURGE (keep
freed pages for reuse) does:

    1024 tokens/pair      glibc defaults       jemalloc            jemalloc, NO_PURGE   threshold 4 MiB
    checkpointing         0.103/s  3.52 GB     0.076/s  1.71 GB    0.123/s  2.04 GB     0.073/s  1.87 GB
    no checkpointing      0.116/s  9.69 GB     0.079/s  6.00 GB    0.129/s  7.73 GB     -
    2048, no checkp.      (0.043/s 16.9 GB)    0.041/s 10.87 GB    0.059/s 13.20 GB     -

(allocators-faults.json; the glibc figure at 2048 is the table above's, another day.)

A threshold fixed at 64 KiB gets jemalloc's peak but faults fresh pages in at every allocation
above it (1.4x the time at 256-1024 tokens); fixed at 4 MiB, only the large activation tensors are
mapped one by one: most of the saving at 2048 tokens without checkpointing and no measurable cost
at 256, but the same faults as jemalloc with checkpointing. So:

* `auto` (default): the `preftune` command relaunches itself once with jemalloc in LD_PRELOAD when
  the library is installed (Debian/Ubuntu: `apt install libjemalloc2`), before it loads anything;
  without it, `release`. Library users of `train()` get jemalloc by starting Python with
  LD_PRELOAD themselves, and `release` otherwise. The smallest peak, not the fastest step.
* `fast`: jemalloc with MALLOC_CONF=NO_PURGE (the user's MALLOC_CONF wins): the fastest measured,
  1.4-1.6x auto's pairs/s and 1.1-1.4x glibc's, at 1.2-1.3x auto's peak and 0.6-0.8x glibc's;
  glibc's defaults without jemalloc. Not the default yet: `preftune advise` is fitted to auto's
  peaks, and its points have not been measured on `fast`.
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

__all__ = ["MMAP_THRESHOLD", "NO_PURGE", "JEMALLOC_PATHS", "jemalloc_path", "preload_env", "relaunch_with_jemalloc",
           "release_freed_memory"]

MMAP_THRESHOLD = 4 << 20  # bytes: `release` maps and unmaps blocks from this size up one by one
# jemalloc's decay hands freed pages back to the system a little at a time, whatever the decay time;
# a training step frees and allocates the same large activation buffers again, so every page is
# faulted in and zeroed again (a quarter of the CPU in the kernel with checkpointing, measured).
# PREFTUNE_MALLOC=fast relaunches with this instead: freed pages kept for reuse (the user's own
# MALLOC_CONF wins).
NO_PURGE = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
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
    """`environ` with jemalloc first in LD_PRELOAD (and for `fast` MALLOC_CONF=NO_PURGE unless the user
    set MALLOC_CONF), for a process started from it; None when PREFTUNE_MALLOC is neither `auto` nor
    `fast`, the library is absent, this is not Linux, the user chose an allocator, or this process is
    the relaunched one."""
    choice = env("PREFTUNE_MALLOC")
    if choice not in ("auto", "fast") or platform.system() != "Linux" or environ.get(_GUARD) or _kept(environ):
        return None
    lib = jemalloc_path()
    if lib is None:
        return None
    preload = environ.get("LD_PRELOAD", "")
    conf = {"MALLOC_CONF": environ.get("MALLOC_CONF") or NO_PURGE} if choice == "fast" else {}
    return {**environ, "LD_PRELOAD": f"{lib}:{preload}" if preload else lib, **conf, _GUARD: "1"}


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
    if loaded == "jemalloc" and os.environ.get("MALLOC_CONF"):
        return f"jemalloc, MALLOC_CONF={os.environ['MALLOC_CONF']}"
    if loaded:
        return loaded
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's own"
    choice, kept = env("PREFTUNE_MALLOC"), _kept(os.environ)
    if kept or choice in ("system", "fast"):  # fast without jemalloc: glibc's arenas keep freed pages too
        return f"glibc ({kept})" if kept else "glibc defaults"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "glibc defaults (mallopt not found)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "glibc defaults (mallopt refused)"
    return f"glibc, mmap threshold {MMAP_THRESHOLD}"
