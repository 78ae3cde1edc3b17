"""The torch thread count for the duration of a block."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int]):
    """``torch.set_num_threads(num_threads)`` for the duration of the block (None: leave as is), then restore."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
