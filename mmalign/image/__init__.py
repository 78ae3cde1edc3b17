"""Preference alignment of text-to-image diffusion models (SPEC §7): Diffusion-DPO, mDPO and every mmalign objective
on the denoising surrogate ρ = −(e_θ − e_ref).

Entry points (imported lazily, so ``import mmalign.image`` stays light):

- :func:`train` — ``mmalign.image.train(config)``; CLI ``python -m mmalign.image.train --config ...``.
- :func:`online` — rounds of generate → score with an image reward → group → train (``mmalign.image.online``).
- :class:`DiffusionPreferenceModel` — policy/reference denoising errors for pairs and groups, as the objective
  layer's :class:`~mmalign.shared.records.LogLikelihoods` record.
- :func:`generate_images`, :func:`save_image_grid` — seeded evaluation sampling.
- :func:`load_group_records`, :class:`ImagePreferenceDataset` — preference data.
"""

from importlib import import_module

_LAZY = {
    "train": "mmalign.image.train",
    "online": "mmalign.image.online",
    "ImageTrainConfig": "mmalign.image.config",
    "DiffusionPreferenceModel": "mmalign.image.diffusion",
    "generate_images": "mmalign.image.generation",
    "save_image_grid": "mmalign.image.generation",
    "load_group_records": "mmalign.image.data",
    "ImagePreferenceDataset": "mmalign.image.data",
    "collate_groups": "mmalign.image.data",
    "load_diffusion_components": "mmalign.image.models",
    "TextConditioner": "mmalign.image.conditioning",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmalign.image' has no attribute {name!r}")
