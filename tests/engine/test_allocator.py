"""training.release_freed_memory: glibc's mmap threshold fixed once, so freed activations leave the resident set."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmalign.engine import allocator

ROOT = Path(__file__).resolve().parents[2]

# Touches 96 blocks of 1 MiB, frees every other one (the rest pins the heap around the holes, as a step's kept
# activations do) and prints how much of the freed 48 MiB left the resident set.
_FRAGMENT = textwrap.dedent("""
    import os, sys, torch
    from mmalign.engine.allocator import release_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    print(release_freed_memory(sys.argv[1] == "on"))
    warm = [torch.ones(2**18) for _ in range(8)]  # raises glibc's dynamic threshold past 1 MiB
    del warm
    blocks = [torch.ones(2**18) for _ in range(96)]
    before = rss()
    del blocks[::2]
    print(before - rss())
""")


def _released_mib(setting: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, setting], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_freed_blocks_leave_the_resident_set_only_with_the_setting():
    applied, released = _released_mib("on")
    assert applied == "True" and released > 40
    applied, released = _released_mib("off")
    assert applied == "False" and released < 8


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_the_threshold_is_set_once_and_not_when_off(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.release_freed_memory(False) is False and libc.calls == []
    assert allocator.release_freed_memory(True) is True
    assert allocator.release_freed_memory(True) is True
    assert libc.calls == [(-3, 128 * 1024)]


def test_without_glibc_nothing_is_done(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.release_freed_memory(True) is False
