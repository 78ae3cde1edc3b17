"""Where a fast path falls back to the plain code: a warning once per (fast path, reason) and a count of the LoRA
calls that took peft's forward. A leaf module (no mmalign imports) in the engine, so both backends' fast paths
(text: :mod:`mmalign.text.modeling.fast_paths`; image: the direct LoRA forward on its backbones) share one count
and one set of warnings. ``mmalign.text.modeling.fallbacks`` re-exports it under its old name."""
from __future__ import annotations

import logging
from collections import Counter

__all__ = ["warn_not_taken", "lora_fallback", "fast_path_taken", "LORA_FALLBACK_CALLS", "FAST_PATH_CALLS", "reset_warnings"]

logger = logging.getLogger("mmalign.engine.fast_paths")

# Calls of a direct-forward LoRA layer that went through peft's forward instead, by reason (tests read it).
LORA_FALLBACK_CALLS: Counter = Counter()
# Calls that took a per-call fast path, by fast path (tests assert the benchmarked layouts take them).
FAST_PATH_CALLS: Counter = Counter()
_warned: set[tuple[str, str]] = set()


def warn_not_taken(fast_path: str, why: str) -> None:
    """Logs ``fast path <fast_path> not taken: <why>`` once per (fast path, reason) in this process."""
    if (fast_path, why) not in _warned:
        _warned.add((fast_path, why))
        logger.warning("fast path %s not taken: %s", fast_path, why)


def lora_fallback(reason: str) -> None:
    """Counts one call of a direct-forward LoRA layer that took peft's forward, and warns once per reason."""
    LORA_FALLBACK_CALLS[reason] += 1
    warn_not_taken("lora.direct_forward", f"{reason}; this call goes through peft's forward")


def fast_path_taken(fast_path: str) -> None:
    """Counts one call that took the per-call fast path ``fast_path``."""
    FAST_PATH_CALLS[fast_path] += 1


def reset_warnings() -> None:
    """Forgets which warnings were given and the fallback and fast-path counts (tests)."""
    _warned.clear()
    LORA_FALLBACK_CALLS.clear()
    FAST_PATH_CALLS.clear()
