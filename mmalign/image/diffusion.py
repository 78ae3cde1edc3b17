"""The diffusion adapter: denoising errors of policy and reference as log-likelihood surrogates (SPEC §7).

For a batch of preference pairs or groups, :class:`DiffusionPreferenceModel`:

1. encodes every image once (VAE latents × ``scaling_factor`` for latent diffusion; raw pixels in [-1, 1] for a
   pixel-space UNet), or takes cached latents;
2. samples ONE timestep ``t`` and ONE noise ``ε`` per pair/group and shares them across all of its members
   (chosen and rejected), so the comparison is between images, not between noise draws;
3. computes the per-sample error ``e = mean((target − model(x_t, t, c))²)`` over latent elements, with
   ``target = ε`` (ε-prediction), ``v`` from the scheduler's ``get_velocity`` (v-prediction) or ``x₀`` (sample),
   for the policy and for the reference (the LoRA-disabled base UNet, or a frozen copy);
4. returns the log-likelihood surrogates ``−e_θ`` and ``−e_ref``, so that any ``mmalign.objective`` sees
   ``ρ = −(e_θ − e_ref)``: ``[B]``-shaped pairs become ``[B, 1]``; groups ``[B, k]`` with masks for ragged ones.

All chosen and rejected members go through the policy UNet in ONE concatenated forward (and through the reference
in one no-grad forward). Padding members of ragged groups are never computed.

CNRPO: with ``triggers`` set, the current policy is also evaluated (no grad) on ``prompt ⊕ trigger_i`` with the same
``x_t``, giving ``triggered_chosen``/``triggered_rejected`` ``[B, n_triggers]`` (the group mean of ``−e_θ``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mmalign.engine import targets
from mmalign.image.conditioning import TextConditioner, split_conditioning
from mmalign.shared.objectives.batch import masked_mean
from mmalign.shared.records import LogLikelihoods

__all__ = ["DiffusionPreferenceModel", "denoising_errors", "denoising_target", "per_sample_error"]


def denoising_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The regression target of the scheduler's prediction type (ε, v or x₀)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``mean((target − prediction)²)`` over every dimension but the first, in float32: ``[N]``."""
    difference = prediction.float() - target.float()
    return difference.pow(2).flatten(1).mean(1)


def denoising_errors(record: LogLikelihoods) -> tuple[Tensor, Tensor]:
    """Mean policy error ``e_θ`` and mean reference error ``e_ref`` over every valid member (detached): the image
    record holds ``−e``."""
    return (_masked_group_mean(-record.policy_chosen, -record.policy_rejected, record.chosen_mask, record.rejected_mask),
            _masked_group_mean(-record.ref_chosen, -record.ref_rejected, record.chosen_mask, record.rejected_mask))


def _masked_group_mean(chosen: Tensor, rejected: Tensor, chosen_mask: Tensor, rejected_mask: Tensor) -> Tensor:
    """Mean over every valid member of every group, chosen and rejected alike (detached scalar)."""
    values = torch.cat([chosen.detach().reshape(-1), rejected.detach().reshape(-1)])
    return masked_mean(values, torch.cat([chosen_mask.reshape(-1), rejected_mask.reshape(-1)]))


class DiffusionPreferenceModel(nn.Module):
    """Policy UNet + reference + frozen encoders; ``forward(batch)`` returns the objective layer's :class:`~mmalign.shared.records.LogLikelihoods` (``−e``; the timesteps in ``details``).

    Args:
        unet: the policy UNet (with a LoRA adapter when ``reference_unet`` is None).
        noise_scheduler: a diffusers noise scheduler (``add_noise``, ``get_velocity``, ``config.prediction_type``,
            ``config.num_train_timesteps``).
        conditioner: ``prompts -> encoder_hidden_states`` (frozen).
        vae: the frozen AutoencoderKL of a latent-diffusion model; None for pixel space.
        reference_unet: a frozen reference UNet (full fine-tuning); None = the policy UNet with its adapters
            disabled (LoRA; one UNet in memory).
        caption_dropout: probability of replacing a pair's/group's prompt by the empty prompt (classifier-free
            guidance training); policy and reference of the same sample see the same condition.
        triggers: CNRPO trigger strings; each adds a no-grad policy forward on ``prompt ⊕ trigger``.
        trigger_policy: how a trigger is attached (``mmalign.shared.triggers.TriggerPolicy``; default append).
        timestep_range: ``[low, high)`` of the uniformly sampled training timesteps (default all).
        latent_sampling: ``"sample"`` (draw from the VAE posterior, as the diffusers scripts) or ``"mode"``.
        vae_batch_size: images per VAE encoder call (None = the whole batch at once). The encoder's full-resolution
            activations are the step's largest transient tensors at real image sizes; slicing bounds them. The
            posterior parameters are concatenated and sampled ONCE for the whole batch, so the random draws are
            those of an unsliced encode.

    Batch (from :func:`mmalign.image.data.collate_groups`): ``prompts`` (list of B str), ``chosen`` ``[B, k_w, C, H, W]``,
    ``rejected`` ``[B, k_l, C, H, W]``, ``chosen_mask``/``rejected_mask`` ``[B, k]`` bool, ``inputs`` one of
    ``"pixels"`` (encode with the VAE if any), ``"latent_parameters"`` (cached posterior mean ‖ std along channels) or
    ``"latents"`` (already scaled); optionally ``bins``, and ``timesteps`` ``[B]`` / ``noise`` ``[B, *latent_shape]`` to
    fix the per-group draws (fixed-noise evaluation).
    """

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler,
        conditioner: TextConditioner,
        vae: Optional[nn.Module] = None,
        reference_unet: Optional[nn.Module] = None,
        *,
        caption_dropout: float = 0.0,
        triggers: Sequence[str] = (),
        trigger_policy: Any = None,
        timestep_range: Optional[tuple[int, int]] = None,
        latent_sampling: str = "sample",
        vae_batch_size: Optional[int] = 4,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1); got {caption_dropout}")
        if latent_sampling not in ("sample", "mode"):
            raise ValueError(f"latent_sampling must be 'sample' or 'mode'; got {latent_sampling!r}")
        if vae_batch_size is not None and (isinstance(vae_batch_size, bool) or not isinstance(vae_batch_size, int)
                                           or vae_batch_size < 1):
            raise ValueError(f"vae_batch_size must be a positive int or None; got {vae_batch_size!r}")
        self.unet = unet
        self.reference_unet = reference_unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.conditioner = conditioner
        if reference_unet is None and not getattr(unet, "_hf_peft_config_loaded", False):
            raise ValueError("DiffusionPreferenceModel: without a reference_unet the policy UNet needs a LoRA adapter "
                             "(its disabled-adapter base is the reference)")
        # the adapter-disabled reference runs in eval mode when the UNet has active dropout (fixed targets)
        self._reference_dropout = reference_unet is None and targets.has_active_dropout(unet)
        self.caption_dropout = float(caption_dropout)
        self.triggers = tuple(triggers)
        self.trigger_policy = trigger_policy
        num_timesteps = int(noise_scheduler.config.num_train_timesteps)
        low, high = timestep_range if timestep_range is not None else (0, num_timesteps)
        if not 0 <= low < high <= num_timesteps:
            raise ValueError(f"timestep_range must satisfy 0 <= low < high <= {num_timesteps}; got {(low, high)}")
        self.timestep_range = (int(low), int(high))
        self.latent_sampling = latent_sampling
        self.vae_batch_size = vae_batch_size

    # -------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        self.training = mode
        self.unet.train(mode)
        for frozen in (self.reference_unet, self.vae, self.conditioner):
            if isinstance(frozen, nn.Module):
                frozen.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @contextlib.contextmanager
    def _reference_mode(self):
        """Yields the reference UNet: the frozen copy, or the policy UNet with its adapters disabled (the engine's
        :func:`~mmalign.engine.targets.reference_forward`, no grad, shared with the text backend)."""
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        with targets.reference_forward(self.unet, deterministic=self._reference_dropout):
            yield self.unet

    # -------------------------------------------------------------------------------------- pieces
    @torch.no_grad()
    def encode_images(self, images: Tensor, inputs: str = "pixels") -> Tensor:
        """Images ``[N, C, H, W]`` → the diffusion space: scaled VAE latents, or pixels as they are."""
        if inputs == "latents":
            return images.float()
        if inputs == "latent_parameters":
            mean, std = images.float().chunk(2, dim=1)
            latents = mean + std * torch.randn_like(mean) if self.latent_sampling == "sample" else mean
            return self._scale_latents(latents)
        if inputs != "pixels":
            raise ValueError(f"batch['inputs'] must be 'pixels', 'latents' or 'latent_parameters'; got {inputs!r}")
        if self.vae is None:
            return images.float()
        mean, std = self._posterior(images)
        # one draw for the whole batch (shape of the unsliced posterior), whatever the encoder slicing
        if self.latent_sampling == "sample":
            noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)  # as posterior.sample()
            latents = mean + std * noise
        else:
            latents = mean
        return self._scale_latents(latents.float())

    @torch.no_grad()
    def latent_parameters(self, images: Tensor) -> Tensor:
        """The VAE posterior's mean ‖ std along channels (what the latent cache stores)."""
        if self.vae is None:
            raise ValueError("latent caching needs a VAE; a pixel-space model has no latents to cache")
        return torch.cat(self._posterior(images), dim=1).float()

    @torch.no_grad()
    def _posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """VAE posterior ``(mean, std)`` of ``images``, encoded ``vae_batch_size`` images at a time (no grad)."""
        vae_dtype = next(self.vae.parameters()).dtype
        size = self.vae_batch_size or images.shape[0]
        means, stds = [], []
        for start in range(0, images.shape[0], size):
            posterior = self.vae.encode(images[start: start + size].to(vae_dtype)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        if len(means) == 1:
            return means[0], stds[0]
        return torch.cat(means), torch.cat(stds)

    def _scale_latents(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        """``(encoder_hidden_states [B, L, D], encoder_attention_mask [B, L] or None)``."""
        states, mask = split_conditioning(self.conditioner(list(prompts)))
        return states.to(self.device), (mask.to(self.device) if mask is not None else None)

    def _drop_captions(self, prompts: list[str]) -> list[str]:
        if not (self.training and self.caption_dropout > 0):
            return prompts
        drop = torch.rand(len(prompts)) < self.caption_dropout
        return ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]

    def sample_timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        low, high = self.timestep_range
        return torch.randint(low, high, (batch_size,), device=device, dtype=torch.long)

    def _noise_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, target)`` of the scheduler (DDPM here; flow-matching families override it)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy, denoising_target(self.noise_scheduler, latents, noise, timesteps)

    def _unet_error(self, unet: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: tuple[Tensor, Optional[Tensor]],
                    target: Tensor) -> Tensor:
        dtype = next(unet.parameters()).dtype
        states, mask = conditions
        prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=states.to(dtype),
                          encoder_attention_mask=mask, return_dict=False)[0]
        return per_sample_error(prediction, target)

    @staticmethod
    def _per_member(conditions: tuple[Tensor, Optional[Tensor]], group_index: Tensor):
        states, mask = conditions
        return states[group_index], (mask[group_index] if mask is not None else None)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any]) -> LogLikelihoods:
        chosen, rejected = batch["chosen"], batch["rejected"]
        batch_size, k_chosen = chosen.shape[:2]
        k_rejected = rejected.shape[1]
        device = chosen.device
        chosen_mask = batch.get("chosen_mask")
        rejected_mask = batch.get("rejected_mask")
        if chosen_mask is None:
            chosen_mask = torch.ones(batch_size, k_chosen, dtype=torch.bool, device=device)
        if rejected_mask is None:
            rejected_mask = torch.ones(batch_size, k_rejected, dtype=torch.bool, device=device)
        prompts = list(batch["prompts"])
        if len(prompts) != batch_size:
            raise ValueError(f"batch has {batch_size} groups but {len(prompts)} prompts")

        # Members laid out [all chosen slots | all rejected slots]; padding slots are dropped before any compute.
        valid = torch.cat([chosen_mask.reshape(-1), rejected_mask.reshape(-1)])
        group_of_slot = torch.cat([
            torch.arange(batch_size, device=device).repeat_interleave(k_chosen),
            torch.arange(batch_size, device=device).repeat_interleave(k_rejected),
        ])
        images = torch.cat([chosen.flatten(0, 1), rejected.flatten(0, 1)])
        if not bool(valid.all()):  # only ragged groups need the (copying) boolean selection
            images = images[valid]
        group_index = group_of_slot[valid]
        latents = self.encode_images(images, batch.get("inputs", "pixels"))
        del images  # the pixel copy must not stay alive through the UNet forwards

        # ONE t and ONE ε per group, shared by every member (or given: fixed-noise evaluation, tests).
        timesteps = batch.get("timesteps")
        if timesteps is None:
            timesteps = self.sample_timesteps(batch_size, device)
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn((batch_size,) + tuple(latents.shape[1:]), device=device, dtype=latents.dtype)
        if tuple(timesteps.shape) != (batch_size,) or tuple(noise.shape) != (batch_size,) + tuple(latents.shape[1:]):
            raise ValueError(f"batch timesteps/noise must have shapes [{batch_size}] and "
                             f"{[batch_size] + list(latents.shape[1:])}; got {list(timesteps.shape)}, {list(noise.shape)}")
        member_t = timesteps[group_index]
        member_noise = noise[group_index]
        noisy, target = self._noise_and_target(latents, member_noise, member_t)

        conditions = self._per_member(self.encode_prompts(self._drop_captions(prompts)), group_index)

        # Reference first: toggling adapters must not happen between the policy forward and its backward.
        with torch.no_grad(), self._reference_mode() as reference:
            ref_error = self._unet_error(reference, noisy, member_t, conditions, target)
        policy_error = self._unet_error(self.unet, noisy, member_t, conditions, target)

        extra: dict[str, Tensor] = {}
        if self.triggers:
            extra.update(self._triggered(prompts, noisy, member_t, target, group_index, valid,
                                         batch_size, k_chosen, k_rejected, chosen_mask, rejected_mask))
        if batch.get("bins") is not None:
            extra["bins"] = batch["bins"]

        policy_chosen, policy_rejected = self._to_groups(-policy_error, valid, batch_size, k_chosen, k_rejected)
        ref_chosen, ref_rejected = self._to_groups(-ref_error, valid, batch_size, k_chosen, k_rejected)
        return LogLikelihoods(
            policy_chosen=policy_chosen,
            policy_rejected=policy_rejected,
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            extra=extra,
            details={"timesteps": timesteps},
        )

    @staticmethod
    def _to_groups(values: Tensor, valid: Tensor, batch_size: int, k_chosen: int, k_rejected: int):
        slots = values.new_zeros(valid.shape[0]).masked_scatter(valid, values)  # padding slots hold 0
        chosen = slots[: batch_size * k_chosen].view(batch_size, k_chosen)
        rejected = slots[batch_size * k_chosen:].view(batch_size, k_rejected)
        return chosen, rejected

    def _triggered(self, prompts, noisy, member_t, target, group_index, valid, batch_size, k_chosen, k_rejected,
                   chosen_mask, rejected_mask) -> dict[str, Tensor]:
        """CNRPO's triggered inputs through the engine's :func:`~mmalign.engine.targets.triggered_log_likelihoods`:
        each trigger re-encodes the prompts and denoises the same ``x_t``; ``−e`` per member, group means there."""
        from mmalign.shared.triggers import TriggerPolicy, apply_trigger

        policy = self.trigger_policy or TriggerPolicy()

        def score() -> tuple[Tensor, Tensor]:
            chosen_columns, rejected_columns = [], []
            for trigger in self.triggers:
                triggered_prompts = [apply_trigger(prompt, trigger, policy) for prompt in prompts]
                conditions = self._per_member(self.encode_prompts(triggered_prompts), group_index)
                error = self._unet_error(self.unet, noisy, member_t, conditions, target)
                chosen, rejected = self._to_groups(-error, valid, batch_size, k_chosen, k_rejected)
                chosen_columns.append(chosen)
                rejected_columns.append(rejected)
            return torch.stack(chosen_columns, dim=1), torch.stack(rejected_columns, dim=1)  # [B, n_triggers, k]

        return targets.triggered_log_likelihoods(self.unet, score, n_triggers=len(self.triggers),
                                                 chosen_mask=chosen_mask, rejected_mask=rejected_mask)
