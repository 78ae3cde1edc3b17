"""The GPU bench's only calls into mmalign. mmalign's Python API is being reshaped (a ``TrainResult``, a shared seam,
``mmalign.train``); when it moves, this file is the one to follow it.

- text: :func:`train_text` runs mmalign's text trainer on a saved model folder and a JSONL data file.
- image: :func:`image_step` builds one training step of bench_image_dpo's variants (mmalign's
  ``DiffusionPreferenceModel`` step lives there, beside its peers); :func:`policy_unet` finds the trained UNet of any
  variant (to switch gradient checkpointing on).
"""
from __future__ import annotations

from typing import Any, Optional

from gpu_common import BENCH_DIR  # noqa: F401  (puts mmalign and bench/ on sys.path)


def train_text(*, model_dir: str, data_file: str, data_format: str, objective: str, beta: float, lora: bool,
               lora_targets: list[str], gradient_checkpointing: bool, batch_size: int, max_steps: int,
               max_length: int, dtype: str, mixed_precision: str, learning_rate: float, output_dir: str,
               num_threads: Optional[int] = None, overrides: Optional[dict] = None) -> dict[str, Any]:
    """One mmalign text run (policy + live reference: the adapter-disabled base under LoRA, a frozen copy under full
    fine-tuning), no logging, checkpoints, plots or evaluation in the way of the step time. ``overrides``: config
    sections merged key by key over these settings (e.g. ``{"training": {"share_prompt": "off"}}``)."""
    from mmalign.text.train import train

    config = {
        "model": {"name_or_path": model_dir, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing},
        "data": {"train": data_file, "format": data_format},
        "objective": {"name": objective, "beta": beta},
        "lora": {"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": lora_targets},
        "reference": {"mode": "adapter" if lora else "model"},
        "training": {"batch_size": batch_size, "learning_rate": learning_rate, "lr_scheduler": "constant",
                     "max_steps": max_steps, "num_threads": num_threads, "progress_bar": False, "plot": False,
                     "logging_steps": 10_000, "save_total_limit": None, "max_grad_norm": 1.0, "seed": 0,
                     "mixed_precision": mixed_precision, "report_to": ["jsonl"],
                     "max_prompt_length": max_length, "max_response_length": max_length, "max_length": None},
        "output_dir": output_dir,
    }
    for section, values in (overrides or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return train(config).summary()


def image_step(name: str, parts: dict):
    """A step of variant ``name`` (mmalign_lora, mmalign_full, mmalign_mdpo_k{K}, diffusers_*, naive_*)."""
    from bench_image_dpo import make_step

    return make_step(name, parts)


def policy_unet(step):
    """The UNet a step trains: mmalign's steps hold it in their DiffusionPreferenceModel, the peers directly."""
    model = getattr(step, "model", None)
    return model.unet if model is not None else step.unet



def tiny_tokenizer(save_dir=None):
    """mmalign's offline byte-level BPE tokenizer (the text models here are random: any tokenizer will do)."""
    from mmalign.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(save_dir=save_dir)


def write_rows(path, rows: list[dict]):
    from mmalign.io import write_jsonl

    return write_jsonl(path, rows)


def clip_tokenizer(directory, model_max_length: int):
    """mmalign's offline character-level CLIP tokenizer (any prompt tokenizes; no hub)."""
    from mmalign.image.testing import build_tiny_clip_tokenizer

    return build_tiny_clip_tokenizer(directory, model_max_length=model_max_length)


def clip_conditioner(tokenizer, text_encoder):
    from mmalign.image.conditioning import CLIPTextConditioner

    return CLIPTextConditioner(tokenizer, text_encoder)


def set_attention(unet, mode: str) -> str:
    """``sdpa`` or ``xformers`` on ``unet`` (mmalign's own selection); returns the kernel in use."""
    from mmalign.image.models import configure_attention

    return configure_attention(unet, mode)
