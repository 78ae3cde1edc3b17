"""The preference adapter for SDXL / SD3 / FLUX: :class:`DiffusionPreferenceModel` with a family's noise,
conditioning and backbone call (SPEC §7: ``ρ = −(e_θ − e_ref)``; one t and one ε per pair/group, shared by all
of its members; reference = the backbone with its LoRA disabled, or a frozen copy).

- SDXL: DDPM noise (ε or v target); conditions = tokens, pooled embedding and per-member ``add_time_ids``, from
  the batch's ``chosen_original_sizes`` / ``rejected_original_sizes`` and ``chosen_crops_top_left`` /
  ``rejected_crops_top_left`` (``[B, k, 2]``, (h, w) and (top, left)) when given, else original = target = the
  image size and crop (0, 0).
- SD3 / FLUX: rectified flow, ``x_σ = (1 − σ)x₀ + σε``, target ``ε − x₀``, timesteps from
  :class:`~mmalign.image.families.flow.FlowTimestepSampler`; FLUX's error on packed latents with the guidance
  embedding fed ``guidance_scale``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mmalign.image.diffusion import DiffusionPreferenceModel, per_sample_error
from mmalign.image.families.base import Family
from mmalign.image.families.flow import FlowTimestepSampler, flow_noise_and_target
from mmalign.image.families.sdxl import time_ids

__all__ = ["FamilyPreferenceModel"]


class FamilyPreferenceModel(DiffusionPreferenceModel):
    """``DiffusionPreferenceModel`` for a non-SD family; ``unet`` is the backbone (UNet or transformer).

    Extra args: ``family`` (a :class:`Family`), ``sampling_scheduler`` (the pipeline's own, for sampling),
    ``timestep_sampler`` (flow families; default logit-normal on the scheduler's table), ``guidance_scale``
    (FLUX's guidance embedding during training) and ``text_encoders`` (SDXL text-encoder LoRA: the adapted
    encoders by name; the policy conditions on them with gradients, the reference with their adapters disabled).
    """

    def __init__(self, backbone: nn.Module, noise_scheduler, conditioner: nn.Module, vae: nn.Module,
                 reference: Optional[nn.Module] = None, *, family: Family, sampling_scheduler=None,
                 timestep_sampler: Optional[FlowTimestepSampler] = None, guidance_scale: float = 1.0,
                 text_encoders: Optional[dict[str, nn.Module]] = None, **kwargs: Any):
        if family.flow and kwargs.get("timestep_range") is not None:
            raise ValueError(f"{family.name}: timestep_range is for DDPM families; flow matching draws t with "
                             "diffusion.weighting_scheme / shift")
        super().__init__(backbone, noise_scheduler, conditioner, vae, reference, **kwargs)
        self.family = family
        self.sampling_scheduler = sampling_scheduler if sampling_scheduler is not None else noise_scheduler
        if family.flow and timestep_sampler is None:
            timestep_sampler = FlowTimestepSampler(noise_scheduler)
        self.timestep_sampler = timestep_sampler
        self.guidance_scale = float(guidance_scale)
        self._member_time_ids: Optional[Tensor] = None
        self.__dict__["text_encoders"] = text_encoders  # registered already, inside the conditioner
        self._in_reference = False

    # ------------------------------------------------------------------------------ family hooks
    def sample_timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        if self.family.flow:
            return self.timestep_sampler(batch_size, device)
        return super().sample_timesteps(batch_size, device)

    def _noise_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        if self.family.flow:
            return flow_noise_and_target(latents, noise, timesteps, self.noise_scheduler.config.num_train_timesteps)
        return super()._noise_and_target(latents, noise, timesteps)

    def encode_prompts(self, prompts) -> dict[str, Tensor]:
        if not self.text_encoders:
            with torch.no_grad():
                return {key: value.to(self.device) for key, value in self.conditioner(list(prompts)).items()}
        from mmalign.image.families.text_lora import text_adapters_disabled

        encoded = {key: value.to(self.device) for key, value in self.conditioner(list(prompts)).items()}
        with torch.no_grad(), text_adapters_disabled(self.text_encoders):
            encoded.update({f"reference_{key}": value.to(self.device)
                            for key, value in self.conditioner(list(prompts)).items()})
        return encoded

    @contextlib.contextmanager
    def _reference_mode(self):
        with super()._reference_mode() as reference:
            self._in_reference = True
            try:
                yield reference
            finally:
                self._in_reference = False

    def _per_member(self, conditions: dict[str, Tensor], group_index: Tensor) -> dict[str, Tensor]:
        members = {key: value[group_index] for key, value in conditions.items()}
        if self._member_time_ids is not None:
            members["time_ids"] = self._member_time_ids
        return members

    def _unet_error(self, backbone: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: dict[str, Tensor],
                    target: Tensor) -> Tensor:
        if "reference_states" in conditions:  # text-encoder LoRA: the base encoders' output for the reference
            side = "reference_" if self._in_reference else ""
            picked = {"states": conditions[side + "states"], "pooled": conditions[side + "pooled"]}
            if "time_ids" in conditions:
                picked["time_ids"] = conditions["time_ids"]
            conditions = picked
        prediction = self.family.predict(backbone, noisy, timesteps, conditions, guidance_scale=self.guidance_scale)
        if hasattr(self.family, "target_layout"):
            target = self.family.target_layout(target)
        return per_sample_error(prediction, target)

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]):
        self._member_time_ids = self._time_ids(batch) if self.family.name == "sdxl" else None
        try:
            return super().forward(batch)
        finally:
            self._member_time_ids = None

    def _time_ids(self, batch: dict[str, Any]) -> Tensor:
        """Per computed member (valid slots, chosen then rejected) ``add_time_ids`` rows ``[N, 6]``."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        device = chosen.device
        height, width = chosen.shape[-2:]
        if batch.get("inputs", "pixels") != "pixels":
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            height, width = height * scale, width * scale
        size = torch.tensor([float(height), float(width)], device=device)

        def side(name: str) -> tuple[Tensor, Tensor]:
            count = batch[name].shape[0] * batch[name].shape[1]
            original = batch.get(f"{name}_original_sizes")
            crops = batch.get(f"{name}_crops_top_left")
            original = size.expand(count, 2) if original is None else original.reshape(count, 2).to(device).float()
            crops = torch.zeros(count, 2, device=device) if crops is None else crops.reshape(count, 2).to(device).float()
            return original, crops

        (orig_w, crop_w), (orig_l, crop_l) = side("chosen"), side("rejected")
        rows = time_ids(torch.cat([orig_w, orig_l]), torch.cat([crop_w, crop_l]),
                        size.expand(orig_w.shape[0] + orig_l.shape[0], 2))
        valid = torch.cat([_mask(batch, "chosen").reshape(-1), _mask(batch, "rejected").reshape(-1)])
        return rows[valid] if not bool(valid.all()) else rows

    # ------------------------------------------------------------------------------ memory
    def cache_text_embeddings(self, prompts: Iterable[str]) -> int:
        """Encodes every prompt once (plus ``""`` and the CNRPO triggered prompts), then unloads the text
        encoders; returns the number of cached prompts. Later prompts must be among them."""
        from mmalign.image.families.conditioning import cache_prompt_embeddings
        from mmalign.shared.triggers import TriggerPolicy, apply_trigger

        prompts = list(prompts) + [""]
        policy = self.trigger_policy or TriggerPolicy()
        prompts += [apply_trigger(prompt, trigger, policy) for trigger in self.triggers for prompt in prompts]
        cache = cache_prompt_embeddings(self.conditioner, prompts)
        self.conditioner = cache  # the encoders' last reference goes with the old conditioner
        gc.collect()
        return len(cache.table)


def _mask(batch: dict[str, Any], side: str) -> Tensor:
    mask = batch.get(f"{side}_mask")
    if mask is None:
        mask = torch.ones(batch[side].shape[:2], dtype=torch.bool, device=batch[side].device)
    return mask
