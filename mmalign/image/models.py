"""Loading diffusion models for preference training: components, LoRA, reference, attention backend.

Any folder in the diffusers layout (``model_index.json`` + ``unet/`` + ``scheduler/`` [+ ``vae/``]
[+ ``tokenizer/`` + ``text_encoder/``]) loads, from a local path or a hub name: Stable Diffusion 1.x/2.x
(latent space, CLIP text encoder) and pixel-space conditional UNets (no ``vae/``). The text conditioning comes
from the folder's tokenizer + text encoder, or from any factory ``"package.module:callable"`` returning a
:class:`~mmalign.image.conditioning.TextConditioner`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from mmalign.engine.fast_path_log import warn_not_taken
from mmalign.image.conditioning import CLIPTextConditioner, TextConditioner

__all__ = [
    "DiffusionComponents",
    "load_diffusion_components",
    "components_from_pipeline",
    "add_lora",
    "use_direct_lora",
    "frozen_copy",
    "configure_attention",
    "xformers_failure",
    "resolve_text_conditioner",
    "DEFAULT_LORA_TARGETS",
]

logger = logging.getLogger("mmalign.image")

#: The UNet attention projections that Diffusion-DPO LoRA adapts (the diffusers training scripts' choice).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionComponents:
    """What preference training needs from a pipeline.

    ``vae`` is None for pixel-space UNets (the model then denoises raw pixels in [-1, 1]). ``noise_scheduler`` is a
    DDPM scheduler built from the pipeline's scheduler config: it supplies ``add_noise``/``get_velocity`` and the
    prediction type (``epsilon``, ``v_prediction`` or ``sample``).
    """

    unet: nn.Module
    noise_scheduler: Any
    conditioner: TextConditioner
    vae: Optional[nn.Module] = None
    source: str = ""

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def resolve_text_conditioner(spec: str, kwargs: Optional[dict] = None, *,
                             allow_code_hooks: bool = False) -> TextConditioner:
    """Builds a conditioner from the code hook ``"package.module:callable"`` (see ``mmalign.code_hooks``) called
    with ``**kwargs``."""
    from mmalign.code_hooks import import_code_hook

    factory = import_code_hook(spec, key="model.text_conditioner", allow=allow_code_hooks,
                               allow_key="model.allow_code_hooks")
    conditioner = factory(**(kwargs or {}))
    if not callable(conditioner):
        raise ValueError(f"text_conditioner {spec!r} returned {type(conditioner).__name__}, which is not callable")
    return conditioner


def _model_index(name_or_path: str, revision: Optional[str]) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(name_or_path, revision=revision))
    except (OSError, EnvironmentError) as error:
        raise ValueError(
            f"model {name_or_path!r}: no model_index.json (not a diffusers pipeline folder or hub repo): {error}"
        ) from error


def load_diffusion_components(
    name_or_path: str,
    *,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    text_conditioner: Optional[str] = None,
    text_conditioner_kwargs: Optional[dict] = None,
    prediction_type: Optional[str] = None,
    frozen_dtype: str = "float32",
    allow_code_hooks: bool = False,
) -> DiffusionComponents:
    """Loads UNet, noise scheduler, text conditioner and (if present) VAE with ``from_pretrained``.

    ``prediction_type`` overrides the scheduler's (e.g. SD 2.x-768 checkpoints are ``v_prediction``).
    ``frozen_dtype`` is the dtype of the frozen VAE and text encoder (the UNet stays float32 for training;
    mixed precision comes from the trainer's autocast).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if frozen_dtype not in _DTYPES:
        raise ValueError(f"frozen_dtype {frozen_dtype!r}: expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[frozen_dtype]
    index = _model_index(name_or_path, revision)
    for required in ("unet", "scheduler"):
        if required not in index:
            raise ValueError(f"model {name_or_path!r}: model_index.json has no {required!r} component")
    common = {"revision": revision}
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **common)
    scheduler_kwargs = {"prediction_type": prediction_type} if prediction_type else {}
    noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **common, **scheduler_kwargs)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"model {name_or_path!r}: unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    vae = None
    if index.get("vae") and index["vae"][0] is not None:
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, torch_dtype=dtype, **common)
        vae.requires_grad_(False).eval()
    if text_conditioner:
        conditioner = resolve_text_conditioner(text_conditioner, text_conditioner_kwargs,
                                               allow_code_hooks=allow_code_hooks)
    else:
        if not (index.get("tokenizer") and index.get("text_encoder")):
            raise ValueError(
                f"model {name_or_path!r} has no tokenizer/text_encoder; set model.text_conditioner to a "
                "'package.module:callable' that returns a prompts -> encoder_hidden_states module"
            )
        from transformers import AutoTokenizer, CLIPTextModel

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(
            name_or_path, subfolder="text_encoder", variant=variant, dtype=dtype, **common
        )
        conditioner = CLIPTextConditioner(tokenizer, text_encoder)
    if isinstance(conditioner, nn.Module):
        conditioner.requires_grad_(False)
    return DiffusionComponents(unet=unet, noise_scheduler=noise_scheduler, conditioner=conditioner, vae=vae,
                               source=name_or_path)


def components_from_pipeline(
    pipeline: Any,
    *,
    text_conditioner: Optional[str] = None,
    text_conditioner_kwargs: Optional[dict] = None,
    prediction_type: Optional[str] = None,
    frozen_dtype: str = "float32",
    allow_code_hooks: bool = False,
) -> DiffusionComponents:
    """The components of a diffusers pipeline object (``StableDiffusionPipeline`` or any pipeline with ``unet`` and
    ``scheduler``, optionally ``vae``, ``tokenizer`` + ``text_encoder``): its UNet is the one trained, in place;
    the noise scheduler is a DDPM scheduler built from its scheduler's config, as :func:`load_diffusion_components`
    builds it from a folder."""
    from diffusers import DDPMScheduler

    unet, scheduler = getattr(pipeline, "unet", None), getattr(pipeline, "scheduler", None)
    if not isinstance(unet, nn.Module) or scheduler is None:
        raise ValueError(f"pipeline: expected a diffusers pipeline with a UNet and a scheduler; got "
                         f"{type(pipeline).__name__}")
    if frozen_dtype not in _DTYPES:
        raise ValueError(f"model.dtype {frozen_dtype!r}: expected one of {sorted(_DTYPES)}")
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    noise_scheduler = DDPMScheduler.from_config(scheduler.config, **overrides)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"pipeline: unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        vae.to(_DTYPES[frozen_dtype]).requires_grad_(False).eval()
    if text_conditioner:
        conditioner = resolve_text_conditioner(text_conditioner, text_conditioner_kwargs,
                                               allow_code_hooks=allow_code_hooks)
    elif getattr(pipeline, "tokenizer", None) is not None and getattr(pipeline, "text_encoder", None) is not None:
        conditioner = CLIPTextConditioner(pipeline.tokenizer, pipeline.text_encoder.to(_DTYPES[frozen_dtype]))
    else:
        raise ValueError("pipeline: no tokenizer/text_encoder; set model.text_conditioner to a "
                         "'package.module:callable' that returns a prompts -> encoder_hidden_states module")
    if isinstance(conditioner, nn.Module):
        conditioner.requires_grad_(False)
    unet.train()
    return DiffusionComponents(unet=unet, noise_scheduler=noise_scheduler, conditioner=conditioner, vae=vae,
                               source=type(pipeline).__name__)


def add_lora(
    unet: nn.Module,
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
) -> nn.Module:
    """Freezes the UNet and adds a peft LoRA adapter ("default") on ``target_modules``; returns the UNet.

    ``alpha`` defaults to ``rank`` (scale 1). With the adapter disabled the UNet is exactly the base model, which
    is how the reference is computed without a second UNet in memory.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1; got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config)
    for parameter in unet.parameters():  # adapters train in float32 whatever the base dtype
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return unet


def apply_finetuning(backbone: nn.Module, lora) -> Optional[nn.Module]:
    """The ``lora`` section on a UNet / transformer: LoRA (returns None: the reference is the adapter-disabled
    backbone) or, with ``lora.enabled: false``, full fine-tuning (returns a frozen copy as the reference)."""
    if lora.enabled:
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
        add_lora(backbone, rank=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets)
        if lora.direct_forward:
            use_direct_lora(backbone)
        return None
    reference = frozen_copy(backbone)
    backbone.requires_grad_(True)
    return reference


def use_direct_lora(backbone: nn.Module) -> int:
    """``lora.direct_forward`` on a UNet / transformer: its LoRA ``Linear`` layers run as base + one in-place
    ``addmm_`` (:func:`mmalign.engine.lora_forward.use_direct_lora_forward`, the text models' fast path; same
    function and gradients as peft's forward up to float rounding, and the adapter is saved and reloaded as before).
    LoRA layers over anything but ``nn.Linear`` (e.g. convolutions) keep peft's forward, warned once; calls the
    shortcut does not cover (mixed dtypes, autocast, ...) take peft's forward, counted and warned once per reason.
    Returns how many layers took it."""
    from mmalign.engine.fast_path_log import warn_not_taken
    from mmalign.engine.lora_forward import lora_layer_count, use_direct_lora_forward

    direct, total = use_direct_lora_forward(backbone), lora_layer_count(backbone)
    if direct < total:
        warn_not_taken("lora.direct_forward", f"{total - direct} of {total} LoRA layers of the "
                       f"{type(backbone).__name__} are not over a plain nn.Linear; they keep peft's forward")
    return direct


def frozen_copy(unet: nn.Module) -> nn.Module:
    """A frozen deep copy of ``unet`` in eval mode (the reference for full fine-tuning)."""
    reference = copy.deepcopy(unet)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def xformers_failure(dtype: torch.dtype = torch.float16, device: str = "cuda") -> Optional[str]:
    """Why xformers' memory-efficient attention cannot run here, or None when a tiny call of it works.

    Importing xformers is not enough: a wheel built for another torch/CUDA imports fine, warns that its C++/CUDA
    extensions did not load, and then every attention call raises (seen on an H200 with torch 2.11+cu130 and the
    xformers 0.0.35 wheel built for torch 2.10+cu128)."""
    try:
        import xformers.ops  # noqa: F401  (CUDA-only; imported lazily)
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return f"import xformers failed: {type(error).__name__}: {error}"
    try:  # forward and backward: a wheel can carry one kernel and not the other
        query = torch.zeros(1, 8, 1, 64, dtype=dtype, device=device, requires_grad=True)  # [batch, tokens, heads, dim]
        xformers.ops.memory_efficient_attention(query, query, query).sum().backward()
    except Exception as error:  # noqa: BLE001 - NotImplementedError (no operator), RuntimeError, ...
        return f"a test call of xformers.ops.memory_efficient_attention failed: {_first_line(error)}"
    return None


def configure_attention(unet: nn.Module, mode: str = "auto") -> str:
    """Selects the attention kernel; returns the one in use.

    ``auto``: xformers' memory-efficient attention when on CUDA and a test call of it works, else torch SDPA
    (diffusers' default processor; the reason is logged once). ``xformers``: required (error with the reason if it
    cannot run). ``sdpa``: torch ``scaled_dot_product_attention``.
    """
    if mode not in ("auto", "xformers", "sdpa"):
        raise ValueError(f"attention {mode!r}: expected auto, xformers or sdpa")
    on_cuda = any(p.is_cuda for p in unet.parameters()) or torch.cuda.is_available()
    if mode in ("auto", "xformers"):
        if not on_cuda:
            why = "no CUDA device"
        else:
            parameter = next(unet.parameters(), None)
            dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float16
            why = xformers_failure(dtype)
        if why is None:
            try:  # diffusers runs its own check (a float32 call) and raises when that fails
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as error:  # noqa: BLE001
                why = f"diffusers' enable_xformers_memory_efficient_attention failed: {_first_line(error)}"
        if mode == "xformers":
            raise ValueError(f"attention='xformers' cannot be used ({why}): it needs CUDA and a working xformers "
                             f"package; use 'auto' or 'sdpa'")
        if on_cuda:
            warn_not_taken("xformers attention", f"{why}; torch SDPA is used")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
