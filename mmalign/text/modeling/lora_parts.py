"""Moved to :mod:`mmalign.engine.lora_forward` (shared with the image backend); the old names stay importable
from here."""
from mmalign.engine.lora_forward import DIRECT_FORWARD_MARK, LoraParts, base_has_hooks, lora_parts, runs_direct_forward

__all__ = ["LoraParts", "lora_parts", "base_has_hooks", "DIRECT_FORWARD_MARK", "runs_direct_forward"]
