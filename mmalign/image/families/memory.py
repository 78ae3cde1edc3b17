"""Memory features for large pipelines: gradient checkpointing, VAE tiling, 8-bit AdamW (bitsandbytes).

Each function returns the name of the feature it switched on, so a run records what it actually used
(``FamilyPreferenceModel.memory_features``; the recipe tests assert on it).
"""

from __future__ import annotations

from torch import nn

__all__ = ["enable_gradient_checkpointing", "enable_vae_tiling", "trainer_class", "require_bitsandbytes"]


def enable_gradient_checkpointing(backbone: nn.Module) -> str:
    backbone.enable_gradient_checkpointing()
    if not getattr(backbone, "is_gradient_checkpointing", True):
        raise RuntimeError(f"{type(backbone).__name__} did not switch gradient checkpointing on")
    return "gradient_checkpointing"


def enable_vae_tiling(vae: nn.Module) -> str:
    vae.enable_tiling()
    return "vae_tiling"


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("model.optimizer: adamw_8bit needs bitsandbytes (pip install 'mmalign[bnb]' or "
                          "pip install bitsandbytes); use optimizer: adamw without it") from error
    return bitsandbytes


def trainer_class(optimizer: str):
    """The engine's Trainer (``adamw``) or a subclass whose optimiser is bitsandbytes' 8-bit AdamW."""
    from mmalign.engine import Trainer

    if optimizer == "adamw":
        return Trainer
    if optimizer != "adamw_8bit":
        raise ValueError(f"optimizer {optimizer!r}: expected adamw or adamw_8bit")
    bitsandbytes = require_bitsandbytes()

    class Trainer8bit(Trainer):
        def _build_optimizer(self):
            cfg = self.config
            return bitsandbytes.optim.AdamW8bit(
                [p for p in self._params], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)

    return Trainer8bit
