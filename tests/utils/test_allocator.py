import json
import os
import platform
import subprocess
import sys

import pytest

from preftune.utils import allocator

# In a fresh interpreter: 2,000 blocks of 200 KiB (~400 MB) allocated after one 4 MiB block was
# freed (which raises glibc's dynamic mmap threshold past 200 KiB), then 9 in 10 freed. With glibc's
# defaults the survivors pin the arena pages between them; with the threshold fixed, each block
# was its own mapping and the freed ones leave the process.
_PROBE = r"""
import ctypes, json, os, sys
sys.path[:0] = {path!r}
if {fix!r}:
    from preftune.utils.allocator import release_freed_memory
    assert release_freed_memory() == "mmap threshold 65536"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc.free(libc.malloc(4 << 20))
blocks = []
for _ in range(2000):
    p = libc.malloc(200 << 10)
    ctypes.memset(p, 1, 200 << 10)
    blocks.append(p)
full = rss()
for i, p in enumerate(blocks):
    if i % 10:
        libc.free(p)
print(json.dumps({{"held_mb": (full - rss()) / 2**20}}))
"""


def _released_mb(fix: bool) -> float:
    code = _PROBE.format(path=sys.path, fix=fix)
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD", "PREFTUNE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)["held_mb"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_blocks_leave_the_process_with_the_threshold_fixed():
    default, fixed = _released_mb(False), _released_mb(True)
    assert fixed > 300       # ~350 MB of the ~390 MB freed went back to the system
    assert default < 50      # glibc's defaults keep them in the arena


def test_a_users_choice_is_kept(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: calls.append(name))
    monkeypatch.setenv("PREFTUNE_MALLOC", "system")
    assert allocator._apply() == "kept: PREFTUNE_MALLOC=system"
    monkeypatch.delenv("PREFTUNE_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator._apply() == "kept: MALLOC_MMAP_THRESHOLD_ is set"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator._apply().startswith("kept: LD_PRELOAD=")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator._apply() == "kept: not glibc"
    assert calls == []  # mallopt was never looked up
