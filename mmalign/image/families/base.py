"""The small interface a model family implements, and the loading every family shares.

A :class:`Family` knows its pipeline class, its backbone (``unet`` or ``transformer``), its text encoders, how
training noise is made (DDPM for SDXL, rectified flow for SD3/FLUX) and how its backbone is called
(:meth:`Family.predict`). :func:`load_family_components` loads a pipeline folder into :class:`FamilyComponents`
with the dtypes and the fp16-safe VAE choice of the config; components are built only from the classes named in
``model_index.json`` of the ``diffusers`` and ``transformers`` libraries (no code is ever loaded from the folder).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["Family", "FamilyComponents", "load_family_components", "DTYPES"]

logger = logging.getLogger("mmalign.image")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LIBRARIES = ("diffusers", "transformers")


@dataclass
class FamilyComponents:
    """A loaded pipeline, split into what preference training needs."""

    family: "Family"
    backbone: nn.Module
    noise_scheduler: Any  # training noise (DDPMScheduler or FlowMatchEulerDiscreteScheduler)
    sampling_scheduler: Any  # the pipeline's own scheduler, for sampling
    conditioner: nn.Module
    vae: nn.Module
    source: str = ""


class Family:
    """One model family; subclasses set the names and implement :meth:`predict`."""

    name = ""
    pipeline_class_name = ""
    backbone_name = "unet"
    flow = False
    encoder_names: tuple[str, ...] = ()
    optional_encoders: tuple[str, ...] = ()  # may be absent (None) in the folder, as the pipeline allows

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @staticmethod
    def tokenizer_for(encoder_name: str) -> str:
        return encoder_name.replace("text_encoder", "tokenizer")

    def predict(self, backbone: nn.Module, noisy: Tensor, timesteps: Tensor, conditions: dict[str, Tensor],
                **context: Any) -> Tensor:
        """The backbone's output for ``noisy`` latents ``[N, C, h, w]`` in the same layout."""
        raise NotImplementedError

    def noise_scheduler(self, path: str, revision: Optional[str], prediction_type: Optional[str]):
        from diffusers import DDPMScheduler

        kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision, **kwargs)
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"model {path!r}: unsupported prediction_type {scheduler.config.prediction_type!r}")
        return scheduler

    def save_lora(self, backbone: nn.Module, directory, text_encoders: Optional[dict[str, nn.Module]] = None) -> None:
        """The backbone's LoRA (and the text encoders', SDXL) as ``pytorch_lora_weights.safetensors``, reloadable
        by ``pipe.load_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(backbone))
        extra = {}
        if text_encoders:
            from mmalign.image.families.text_lora import text_encoder_lora_layers

            extra = text_encoder_lora_layers(text_encoders)
        self.pipeline_class.save_lora_weights(
            directory, safe_serialization=True,
            **{f"{self.backbone_name}_lora_layers": layers,
               f"{self.backbone_name}_lora_adapter_metadata": backbone.peft_config["default"].to_dict()}, **extra)

    def sampling_pipeline(self, backbone: nn.Module, vae: nn.Module, scheduler):
        """The family's pipeline around ``backbone`` (LoRA active) without text encoders (embeddings are passed)."""
        import inspect

        parts = {self.backbone_name: backbone, "vae": vae, "scheduler": scheduler}
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        return self.pipeline_class(**{name: parts.get(name) for name in accepted if name != "self"})


def _load_component(path: str, name: str, entry: Any, **kwargs) -> Any:
    library, class_name = entry
    if library not in _LIBRARIES:
        raise ValueError(f"model {path!r}: component {name!r} is {library}.{class_name}; only diffusers and "
                         "transformers classes are loaded")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ValueError(f"model {path!r}: component {name!r} names {library}.{class_name}, which does not exist")
    return cls.from_pretrained(path, subfolder=name, **kwargs)


def load_family_components(family: Family, path: str, index: dict, *, revision: Optional[str] = None,
                           variant: Optional[str] = None, weights_dtype: str = "float32",
                           frozen_dtype: str = "float32", vae_path: Optional[str] = None, use_t5: bool = True,
                           max_sequence_length: Optional[int] = None,
                           prediction_type: Optional[str] = None) -> FamilyComponents:
    """Loads backbone (``weights_dtype``), VAE and text encoders (``frozen_dtype``) and both schedulers.

    The VAE stays float32 when ``frozen_dtype`` is float16 and its config says ``force_upcast`` (SDXL's VAE
    overflows in fp16) unless ``vae_path`` names an fp16-safe one (e.g. sdxl-vae-fp16-fix, ``force_upcast`` false).
    ``use_t5: false`` drops SD3's optional T5 encoder (the pipeline then uses zeros for its tokens).
    """
    from mmalign.image.families.conditioning import PipelinePromptEncoder

    for dtype_name in (weights_dtype, frozen_dtype):
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {dtype_name!r}: expected one of {sorted(DTYPES)}")
    common = {"revision": revision}
    missing = [name for name in (family.backbone_name, "vae", "scheduler") + family.encoder_names
               if name not in family.optional_encoders and not _component_class_of(index, name)]
    missing += [family.tokenizer_for(name) for name in family.encoder_names
                if name not in family.optional_encoders and not _component_class_of(index, family.tokenizer_for(name))]
    if missing:
        raise ValueError(f"model {path!r} ({family.name}): model_index.json lacks component(s) {', '.join(missing)}")
    backbone = _load_component(path, family.backbone_name, index[family.backbone_name], variant=variant,
                               torch_dtype=DTYPES[weights_dtype], **common)
    vae = _load_vae(path, index, vae_path, frozen_dtype, variant, revision)
    encoders, tokenizers = {}, {}
    for name in family.encoder_names:
        tokenizer_name = family.tokenizer_for(name)
        present = _component_class_of(index, name) is not None
        if name in family.optional_encoders and (not use_t5 or not present):
            encoders[name], tokenizers[tokenizer_name] = None, None
            continue
        encoders[name] = _load_component(path, name, index[name], variant=variant, dtype=DTYPES[frozen_dtype],
                                         **common).requires_grad_(False).eval()
        tokenizers[tokenizer_name] = _load_component(path, tokenizer_name, index[tokenizer_name], **common)
    conditioner = PipelinePromptEncoder(family.name, family.pipeline_class, encoders, tokenizers, backbone,
                                        max_sequence_length=max_sequence_length)
    sampling_scheduler = _load_component(path, "scheduler", index["scheduler"], **common)
    return FamilyComponents(family=family, backbone=backbone,
                            noise_scheduler=family.noise_scheduler(path, revision, prediction_type),
                            sampling_scheduler=sampling_scheduler, conditioner=conditioner, vae=vae, source=path)


def _component_class_of(index: dict, name: str) -> Optional[str]:
    entry = index.get(name)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else None


def _load_vae(path: str, index: dict, vae_path: Optional[str], frozen_dtype: str, variant, revision) -> nn.Module:
    from diffusers import AutoencoderKL

    if vae_path:
        vae = AutoencoderKL.from_pretrained(vae_path)
    else:
        vae = _load_component(path, "vae", index["vae"], variant=variant, revision=revision)
    dtype = DTYPES[frozen_dtype]
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        logger.info("VAE kept in float32: its config says force_upcast (fp16 overflows); set model.vae to an "
                    "fp16-safe VAE (force_upcast: false) to run it in float16")
        dtype = torch.float32
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.requires_grad_(False).eval()
