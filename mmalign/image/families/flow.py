"""Rectified-flow training noise for SD3 / FLUX (flow matching), the counterpart of DDPM's ``add_noise``.

With σ ∈ (0, 1] the interpolation is ``x_σ = (1 − σ)·x₀ + σ·ε`` and the model regresses the velocity
``v = ε − x₀``; the surrogate is then ``ρ = −(e_θ − e_ref)`` on ``e = mean((v − v̂)²)`` (SPEC §7 with the velocity
as the target). Timesteps follow the diffusers flow-matching training scripts: a density ``u ∈ (0, 1)``
(``logit_normal``: sigmoid of N(mean, std); ``mode``: the SD3 paper's mode sampling with ``mode_scale``;
``uniform``) indexes the scheduler's own table ``timesteps = σ·T`` (which carries the scheduler's ``shift``);
``shift`` overrides that shift: ``σ = shift·s / (1 + (shift − 1)·s)`` on the unshifted ``s``.
Model timesteps are floats ``t = σ·T`` (``T = num_train_timesteps``), so ``σ = t / T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["FlowTimestepSampler", "flow_noise_and_target", "timestep_density", "WEIGHTING_SCHEMES"]

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")


def timestep_density(scheme: str, size: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29, generator: Optional[torch.Generator] = None) -> Tensor:
    """``size`` draws ``u ∈ (0, 1)`` of the flow-matching timestep density ``scheme`` (float32, CPU)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(size, generator=generator) * logit_std + logit_mean)
    if scheme == "mode":
        u = torch.rand(size, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return torch.rand(size, generator=generator)
    raise ValueError(f"weighting_scheme {scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}")


@dataclass
class FlowTimestepSampler:
    """Draws model timesteps ``t = σ·T`` from the scheduler's table (``shift`` None = the scheduler's own)."""

    scheduler: object
    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: Optional[float] = None

    def __post_init__(self) -> None:
        if self.scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {self.scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0; got {self.shift}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0; got {self.logit_std}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.table = self._table()

    def _table(self) -> Tensor:
        """``σ·T`` for index 0..T−1, descending from T (the scheduler's ``timesteps`` at construction)."""
        if self.shift is None:
            return torch.as_tensor(self.scheduler.timesteps, dtype=torch.float32).clone()
        count = self.num_train_timesteps
        unshifted = torch.linspace(1, count, count).flip(0) / count
        shifted = self.shift * unshifted / (1 + (self.shift - 1) * unshifted)
        return shifted * count

    def __call__(self, batch_size: int, device: torch.device) -> Tensor:
        u = timestep_density(self.scheme, batch_size, logit_mean=self.logit_mean, logit_std=self.logit_std,
                             mode_scale=self.mode_scale)
        indices = (u * len(self.table)).long().clamp(0, len(self.table) - 1)
        return self.table[indices].to(device)


def flow_noise_and_target(latents: Tensor, noise: Tensor, timesteps: Tensor, num_train_timesteps: int):
    """``(x_σ, v)``: ``x_σ = (1 − σ)·x₀ + σ·ε`` with ``σ = t / T`` per sample, velocity ``v = ε − x₀``."""
    sigma = (timesteps.float() / num_train_timesteps).view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigma) * latents + sigma * noise
    return noisy, noise - latents
