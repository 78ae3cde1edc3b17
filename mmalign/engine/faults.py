"""Kill points for the crash/resume torture tests (``tests/engine/test_torture.py``); inert unless armed.

``MMALIGN_FAULT_INJECT=<point>:<step>`` in the environment makes the process SIGKILL itself when the engine reaches
that point at that optimizer step: inside a checkpoint write, before its rename, mid-rotation, mid metrics line,
before/inside the final save. Read once at import; every point is off the per-step hot path.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import IO

__all__ = ["POINTS", "fault_point", "torn_write"]

POINTS = ("checkpoint_files", "checkpoint_manifest", "before_rotation", "mid_rotation", "metrics_line",
          "before_final", "final_tmp")

_ARMED = os.environ.get("MMALIGN_FAULT_INJECT", "")


def _armed(point: str, step: int) -> bool:
    return bool(_ARMED) and _ARMED == f"{point}:{step}"


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(point: str, step: int) -> None:
    if _armed(point, step):
        _kill()


def torn_write(handle: IO[str], text: str, step: int) -> bool:
    """At the armed ``metrics_line`` point: writes half of ``text``, flushes, and dies; else returns False."""
    if not _armed("metrics_line", step):
        return False
    handle.write(text[: len(text) // 2])
    handle.flush()
    _kill()
    return True  # not reached
