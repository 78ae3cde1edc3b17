"""Moved to :mod:`mmalign.engine.fast_path_log` (shared with the image backend's direct LoRA forward); the old
names stay importable from here, as the same objects."""
from mmalign.engine.fast_path_log import (FAST_PATH_CALLS, LORA_FALLBACK_CALLS, fast_path_taken, lora_fallback,
                                          reset_warnings, warn_not_taken)

__all__ = ["warn_not_taken", "lora_fallback", "fast_path_taken", "LORA_FALLBACK_CALLS", "FAST_PATH_CALLS", "reset_warnings"]
