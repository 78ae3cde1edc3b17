"""glibc's heap and a training step's peak memory.

A training step frees and re-allocates hundreds of activation-sized blocks (0.1-50 MiB). glibc's malloc serves
blocks over its *dynamic* mmap threshold with ``mmap`` (returned to the system on ``free``), but raises that
threshold to the size of every such block that is freed, up to 32 MiB; after the first step almost every
activation comes from the heap instead, whose freed space stays resident and fragments, so the resident set grows
over the first steps (SmolLM2-135M + LoRA, 8 pairs: 1,513 MiB after step 1, 1,764 after step 3, peak 1,847).
Fixing the threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, glibc's documented tunable, the same as the
``MALLOC_MMAP_THRESHOLD_`` environment variable) keeps every large block mmapped: the resident set follows the
live tensors (same run: 971 MiB between steps, peak 1,488 MiB). The price is a page fault for every 4 KiB of
every large block allocated, again in every step: +45 % CPU time per SmolLM2 step in an interleaved run
(bench/RESULTS.md). So it is opt-in: ``training.release_freed_memory: true`` for runs that are short of memory
rather than of time. Small blocks keep the heap.

Process-wide and permanent (glibc has no getter to restore the dynamic threshold), like ``torch.set_num_threads``.
Only on Linux with glibc; elsewhere nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Optional

__all__ = ["release_freed_memory", "MMAP_THRESHOLD_BYTES"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own initial value, no longer raised dynamically
_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_applied: Optional[bool] = None


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory(enabled: bool) -> bool:
    """Fixes glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` once per process when ``enabled``; returns
    whether it is in effect."""
    global _applied
    if not enabled or _applied is not None:
        return bool(_applied) and enabled
    libc = _glibc()
    _applied = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    if not _applied:
        logger.info("training.release_freed_memory: not glibc (or mallopt refused); the allocator is left as is")
    return _applied
