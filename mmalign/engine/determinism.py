"""Deterministic kernels for the duration of a run (``training.deterministic``).

On CPU mmalign's runs already repeat bit for bit (seeded, and resumed from a checkpoint). On CUDA they repeat only
approximately: several kernels (attention and convolution backward, atomics in scatter/index sums) add in an order
that changes from run to run, which the H200 run measured (bench/RESULTS.md "GPU"). With the switch on, torch
uses deterministic kernels where it has them and raises, naming the operation, where it has none — a run that
cannot be made repeatable stops instead of silently not repeating. Slower; off by default.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

__all__ = ["deterministic_kernels", "CUBLAS_WORKSPACE"]

logger = logging.getLogger(__name__)

# cuBLAS picks its reduction order from the workspace; a fixed configuration makes it repeatable (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """While the block runs: ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic without autotuning,
    and ``CUBLAS_WORKSPACE_CONFIG`` set when unset; the previous settings come back after."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace_was = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace_was is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            logger.warning("training.deterministic: CUDA was initialised before the run; for cuBLAS to be "
                           "repeatable set CUBLAS_WORKSPACE_CONFIG=%s in the environment before starting",
                           CUBLAS_WORKSPACE)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        if workspace_was is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
