"""Pieces shared by the GPU bench's sections: the case log (one JSON line per case, so a crashed or killed
worker loses nothing already measured), deadlines, step timing, peak memory and the measured matmul rate."""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

BENCH_DIR = Path(__file__).resolve().parents[1]
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):  # mmalign and the CPU benches (bench_text_dpo, bench_image_dpo)
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pick_device(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> float:
    """Frees what earlier cases left and restarts the peak counter; returns the MiB still allocated."""
    import torch

    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def peak_mib(device, cpu_fallback: float = float("nan")) -> float:
    """``torch.cuda.max_memory_allocated`` since :func:`reset_peak` (on CPU: ``cpu_fallback``, the RSS measure)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return cpu_fallback


def memory_measure(device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS at optimizer steps (CPU dry run)"


def make_step_timer(device):
    """bench_text_dpo's StepTimer (a global optimizer post-step hook), synchronising the GPU before each stamp so
    that a stamp marks the end of the step's kernels, not of their launch. Call ``.handle.remove()`` when done."""
    from bench_text_dpo import StepTimer

    class SyncedStepTimer(StepTimer):
        def _hook(self, optimizer, args, kwargs):
            synchronize(device)
            super()._hook(optimizer, args, kwargs)

    return SyncedStepTimer()


def matmul_tflops(device, dtype, size: int, repeats: int = 10, warmup: int = 3) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``size``³ products on random data: the MFU denominator."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed / 1e12


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def median(values) -> float:
    values = [v for v in values if finite(v)]
    return statistics.median(values) if values else float("nan")


# Errors after which every later CUDA call in the process fails too (a sticky context error), unlike an OOM.
FATAL_CUDA_ERRORS = ("device-side assert", "illegal memory access", "CUDA error: unspecified launch failure",
                     "CUBLAS_STATUS_EXECUTION_FAILED", "CUDA error: an illegal instruction")


class CaseLog:
    """Append-only JSON lines: ``{"case", "status": "started"}`` before a case, then its result or error. A worker
    restarted after a crash skips every case already in the log and records the one it died in as an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
            handle.flush()

    def finished(self) -> set[str]:
        return {e["case"] for e in self.entries() if e.get("status") != "started"}

    def unfinished_started(self) -> list[str]:
        done = self.finished()
        return [e["case"] for e in self.entries() if e.get("status") == "started" and e["case"] not in done]

    def results(self) -> list[dict]:
        return [e for e in self.entries() if e.get("status") != "started"]


class CaseRunner:
    """Runs the cases of one section in order within its deadline; every case ends as ok, error or skipped."""

    def __init__(self, log: CaseLog, deadline_at: float, section: str):
        self.log, self.deadline_at, self.section = log, deadline_at, section
        self.durations: dict[str, float] = {}  # kind -> longest duration seen, to skip what cannot finish in time

    def left(self) -> float:
        return self.deadline_at - time.time()

    def run(self, case: str, kind: str, fn: Callable[[], dict], default_estimate: float = 0.0, **labels) -> Optional[dict]:
        if case in self.log.finished():
            return None
        estimate = self.durations.get(kind, default_estimate)
        base = {"section": self.section, "case": case, "kind": kind, **labels}
        if self.left() < estimate:
            self.log.write({**base, "status": "skipped", "reason": f"section budget: {self.left():.0f} s left, "
                            f"the case takes about {estimate:.0f} s"})
            return None
        self.log.write({**base, "status": "started", "time": time.time()})
        start = time.perf_counter()
        try:
            result = fn()
            entry = {**base, "status": "ok", **result}
        except Exception as err:  # noqa: BLE001 - every failure becomes this case's recorded error
            entry = {**base, "status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
        entry["wall_s"] = time.perf_counter() - start
        self.durations[kind] = max(self.durations.get(kind, 0.0), entry["wall_s"])
        self.log.write(entry)
        if entry["status"] == "error" and any(marker in entry["error"] for marker in FATAL_CUDA_ERRORS):
            # the CUDA context is unusable for the rest of this process: exit, the driver starts a fresh worker
            os._exit(3)
        return entry
