import json
import os
import platform
import subprocess
import sys

import pytest

from preftune.utils import allocator

LINUX_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
JEMALLOC = allocator.jemalloc_path()

# In a fresh interpreter: 80 blocks of 5 MiB (400 MiB) allocated after one 16 MiB block was freed
# (which raises glibc's dynamic mmap threshold past 5 MiB), then 9 in 10 freed. With glibc's
# defaults the survivors pin the arena pages between them; with the threshold fixed at 4 MiB
# (release), each block was its own mapping and the freed ones leave the process.
_PROBE = r"""
import ctypes, json, os, sys
sys.path[:0] = {path!r}
from preftune.utils.allocator import release_freed_memory
said = release_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc.free(libc.malloc(16 << 20))
blocks = []
for _ in range(80):
    p = libc.malloc(5 << 20)
    ctypes.memset(p, 1, 5 << 20)
    blocks.append(p)
full = rss()
for i, p in enumerate(blocks):
    if i % 10:
        libc.free(p)
print(json.dumps({{"released_mb": (full - rss()) / 2**20, "said": said}}))
"""


def _python(code: str, **extra) -> dict:
    """`code`'s JSON line from a fresh interpreter whose allocator settings are only `extra`."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD", "PREFTUNE_MALLOC", "MALLOC_CONF", allocator._GUARD)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **extra},
                         check=True)
    return json.loads(out.stdout)


def _probe(**extra) -> dict:
    return _python(_PROBE.format(path=sys.path), **extra)


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's malloc only")
def test_release_hands_freed_blocks_back_and_system_keeps_them():
    kept, released = _probe(PREFTUNE_MALLOC="system"), _probe(PREFTUNE_MALLOC="release")
    assert kept["said"] == "glibc defaults" and released["said"] == "glibc, mmap threshold 4194304"
    assert _probe(PREFTUNE_MALLOC="fast")["said"] == "glibc defaults"  # fast without jemalloc: glibc keeps pages
    assert released["released_mb"] > 300  # the 360 MiB freed went back to the system
    assert kept["released_mb"] < 100      # glibc's defaults keep them in the arena (45 MiB left: its top)


@pytest.mark.skipif(not (LINUX_GLIBC and JEMALLOC), reason="needs libjemalloc2 (apt install libjemalloc2)")
def test_summary_names_jemalloc_when_it_is_loaded():
    assert _probe(LD_PRELOAD=JEMALLOC)["said"] == "jemalloc"  # it returns freed pages later (decay), not at free
    kept = _probe(LD_PRELOAD=JEMALLOC, MALLOC_CONF=allocator.NO_PURGE)
    assert kept["said"] == f"jemalloc, MALLOC_CONF={allocator.NO_PURGE}"


# 40 blocks of 16 MiB written, freed, then allocated and written again: the page faults of the second
# round say whether the freed pages were handed back to the system (and zeroed on the next touch).
_REFAULT = r"""
import ctypes, json, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rounds():
    blocks = [libc.malloc(16 << 20) for _ in range(40)]
    for p in blocks:
        ctypes.memset(p, 1, 16 << 20)
    for p in blocks:
        libc.free(p)
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not (LINUX_GLIBC and JEMALLOC), reason="needs libjemalloc2 (apt install libjemalloc2)")
def test_no_purge_reuses_freed_pages_where_jemalloc_s_default_faults_them_in_again():
    pages = 40 * (16 << 20) // os.sysconf("SC_PAGE_SIZE")  # 163,840 pages of 4 KiB
    assert _python(_REFAULT, LD_PRELOAD=JEMALLOC)["faults"] > pages // 2  # default: purged at free, faulted in again
    kept = _python(_REFAULT, LD_PRELOAD=JEMALLOC, MALLOC_CONF=allocator.NO_PURGE)
    assert kept["faults"] < pages // 20                                     # kept: written again in place


def test_preload_env_puts_jemalloc_first_once(monkeypatch, tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "JEMALLOC_PATHS", (str(tmp_path / "absent.so"), str(lib)))
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.delenv("PREFTUNE_MALLOC", raising=False)
    new = allocator.preload_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so"})
    assert new == {"PATH": "/bin", "LD_PRELOAD": f"{lib}:/opt/libfoo.so", allocator._GUARD: "1"}
    assert allocator.preload_env(new) is None                                   # the relaunched process
    assert allocator.preload_env({"LD_PRELOAD": "/x/libtcmalloc.so.4"}) is None  # the user's allocator
    assert allocator.preload_env({"MALLOC_MMAP_THRESHOLD_": "131072"}) is None
    for choice in ("release", "system"):  # auto is the default
        monkeypatch.setenv("PREFTUNE_MALLOC", choice)
        assert allocator.preload_env({}) is None
    monkeypatch.setenv("PREFTUNE_MALLOC", "fast")  # jemalloc keeping freed pages; the user's MALLOC_CONF wins
    assert allocator.preload_env({}) == {"LD_PRELOAD": str(lib), "MALLOC_CONF": allocator.NO_PURGE, allocator._GUARD: "1"}
    assert allocator.NO_PURGE == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert allocator.preload_env({"MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] == "narenas:2"
    monkeypatch.delenv("PREFTUNE_MALLOC")
    monkeypatch.setattr(allocator, "JEMALLOC_PATHS", (str(tmp_path / "absent.so"),))
    assert allocator.preload_env({}) is None                                    # not installed: nothing changes


@pytest.mark.skipif(not (LINUX_GLIBC and JEMALLOC), reason="needs libjemalloc2 (apt install libjemalloc2)")
def test_the_command_relaunches_itself_under_jemalloc(tmp_path):
    """`preftune validate-data` on a bad file: the relaunched process answers (its one-line error
    and exit 2 come through exec unchanged), and it ran with jemalloc mapped."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    probe = tmp_path / "sitecustomize.py"  # runs in every interpreter started with this PYTHONPATH
    probe.write_text("import os, pathlib\n"
                     "if 'jemalloc' in pathlib.Path('/proc/self/maps').read_text():\n"
                     f"    pathlib.Path({str(tmp_path / 'seen')!r}).write_text(os.environ.get('LD_PRELOAD', ''))\n")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD", "PREFTUNE_MALLOC", "MALLOC_CONF", allocator._GUARD)}
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    out = subprocess.run([sys.executable, "-m", "preftune", "validate-data", str(bad)], capture_output=True,
                         text=True, env=environ)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert (tmp_path / "seen").read_text().startswith(JEMALLOC)
