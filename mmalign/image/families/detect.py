"""Which diffusion model family a pipeline folder (or pipeline object) belongs to.

Families: ``sd`` (SD 1.x/2.x ``UNet2DConditionModel`` with one CLIP encoder, or mmalign's pixel-space UNet folders),
``sdxl`` (UNet + two CLIP encoders + pooled embedding + ``add_time_ids``), ``sd3`` (``SD3Transformer2DModel``,
flow matching, CLIP-L + CLIP-G + optional T5) and ``flux`` (``FluxTransformer2DModel``, flow matching, CLIP + T5,
packed latents). The pipeline's ``_class_name`` decides when it is a known one; otherwise the component classes do.
Anything else is refused with a message naming what was found.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["FAMILY_NAMES", "UnsupportedFamilyError", "detect_family", "family_from_index"]

FAMILY_NAMES = ("sd", "sdxl", "sd3", "flux")

# pipeline class names -> family (the diffusers pipelines whose layout each family module reproduces)
_PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# backbone class names -> family, for folders saved under another pipeline name
_TRANSFORMER_FAMILY = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


class UnsupportedFamilyError(ValueError):
    """The pipeline is not one of the supported families; the message names what was found."""


def _component_class(entry: Any) -> Optional[str]:
    """``["diffusers", "UNet2DConditionModel"]`` -> ``"UNet2DConditionModel"`` (None for absent components)."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def family_from_index(index: Mapping[str, Any], source: str = "pipeline") -> str:
    """The family of a ``model_index.json`` mapping; :class:`UnsupportedFamilyError` for anything else."""
    class_name = str(index.get("_class_name", ""))
    if index.get("_mmalign") == "pixel":
        return "sd"
    if class_name in _PIPELINE_FAMILY:
        return _PIPELINE_FAMILY[class_name]
    components = {name: _component_class(entry) for name, entry in index.items() if not name.startswith("_")}
    transformer = components.get("transformer")
    if transformer in _TRANSFORMER_FAMILY:
        return _TRANSFORMER_FAMILY[transformer]
    if components.get("unet") == "UNet2DConditionModel":
        return "sdxl" if components.get("text_encoder_2") else "sd"
    found = ", ".join(f"{name}={cls}" for name, cls in sorted(components.items()) if cls) or "no components"
    raise UnsupportedFamilyError(
        f"{source}: unsupported diffusion model family (pipeline class {class_name or 'unknown'!r}; components: "
        f"{found}). Supported: StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl), "
        "StableDiffusion3Pipeline (sd3), FluxPipeline (flux)")


def detect_family(pipeline_or_path: Any, *, revision: Optional[str] = None) -> str:
    """The family of a pipeline folder / hub name (its ``model_index.json``) or of a diffusers pipeline object."""
    if isinstance(pipeline_or_path, Mapping):
        return family_from_index(pipeline_or_path)
    if hasattr(pipeline_or_path, "components") and hasattr(pipeline_or_path, "config"):
        index = dict(pipeline_or_path.config)
        index["_class_name"] = type(pipeline_or_path).__name__
        for name, module in pipeline_or_path.components.items():
            index[name] = [type(module).__module__.split(".")[0], type(module).__name__] if module is not None \
                else [None, None]
        return family_from_index(index, source=type(pipeline_or_path).__name__)
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(str(pipeline_or_path), revision=revision))
    except (OSError, EnvironmentError) as error:
        raise ValueError(f"model {str(pipeline_or_path)!r}: no model_index.json (not a diffusers pipeline folder or "
                         f"hub repo): {error}") from error
    return family_from_index(index, source=f"model {str(pipeline_or_path)!r}")
