"""Tiny diffusion models built from configs, for tests, benchmarks and offline smoke runs.

Nothing here downloads anything: the tokenizer vocabulary is generated in code, and every model is randomly
initialised from a small config. The layouts match the real ones, so the same loading code serves both:

- :func:`build_tiny_sd_pipeline` — a Stable-Diffusion-1.x-layout ``StableDiffusionPipeline`` (UNet2DConditionModel
  + AutoencoderKL + CLIPTextModel + CLIPTokenizer + DDPMScheduler), savable with ``save_pretrained``.
- :func:`build_tiny_pixel_model` / :func:`save_tiny_pixel_model` — a pixel-space conditional UNet (no VAE), the shape
  of the debiasing experiments' small models.
- :func:`write_toy_preference_dataset` — a JSONL + PNG group-preference dataset where chosen images are brighter
  than rejected ones (a preference a few training steps can pick up).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "build_tiny_clip_tokenizer",
    "build_tiny_sd_pipeline",
    "save_tiny_sd_pipeline",
    "build_tiny_pixel_model",
    "save_tiny_pixel_model",
    "write_toy_preference_dataset",
    "margin_before_and_after_steps",
    "TINY_TEXT_DIM",
]

# Width of the tiny CLIP text encoder's hidden states (the UNets' cross_attention_dim).
TINY_TEXT_DIM = 32


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (re-derived: printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_clip_tokenizer(directory: str | os.PathLike, model_max_length: int = 16):
    """A character-level CLIPTokenizer written to ``directory`` (vocab.json + merges.txt), built without a hub.

    Every byte symbol and its end-of-word form is a token and there are no merges, so any text tokenizes.
    ``model_max_length`` is short to keep the tiny text encoder cheap.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_byte_to_unicode().values())
    vocab = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length)
    if len(tokenizer) != len(vocab):  # the file layout a tokenizer version reads changed: fail loudly, not later
        raise RuntimeError(f"tiny CLIP tokenizer loaded {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def _tiny_text_encoder(vocab_size: int, max_positions: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def _tiny_unet(in_channels: int, sample_size: int, cross_attention_dim: int, seed: int, prediction_channels=None,
               block_out_channels=(32, 64)):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=prediction_channels or in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        # attention at the lower resolution only, as SD's cost profile (and CPU attention at 32x32 is slow)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny_sd_pipeline(
    tokenizer_dir: str | os.PathLike,
    *,
    image_size: int = 64,
    prediction_type: str = "epsilon",
    seed: int = 0,
    unet_channels: tuple[int, int] = (32, 64),
):
    """A randomly initialised Stable-Diffusion-layout pipeline (UNet ~1.4M params with the default
    ``unet_channels``, VAE downsampling 4x: 64x64 images -> 16x16 latents).

    ``tokenizer_dir`` receives the generated tokenizer files (the pipeline's own ``save_pretrained`` copies them).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tokenizer = build_tiny_clip_tokenizer(tokenizer_dir)
    text_encoder = _tiny_text_encoder(len(tokenizer), tokenizer.model_max_length, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=image_size,
    )
    latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = _tiny_unet(4, latent_size, TINY_TEXT_DIM, seed + 2, block_out_channels=unet_channels)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(directory: str | os.PathLike, **kwargs) -> Path:
    """Build :func:`build_tiny_sd_pipeline` and ``save_pretrained`` it to ``directory``; returns the path."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tokenizer_src:
        pipe = build_tiny_sd_pipeline(tokenizer_src, **kwargs)
        pipe.save_pretrained(directory)
    return directory


def build_tiny_pixel_model(tokenizer_dir: str | os.PathLike, *, image_size: int = 16,
                           prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """Components of a pixel-space text-conditioned UNet: ``{unet, scheduler, tokenizer, text_encoder}``."""
    tokenizer = build_tiny_clip_tokenizer(tokenizer_dir)
    return {
        "unet": _tiny_unet(3, image_size, TINY_TEXT_DIM, seed + 2),
        "scheduler": _scheduler(prediction_type),
        "tokenizer": tokenizer,
        "text_encoder": _tiny_text_encoder(len(tokenizer), tokenizer.model_max_length, seed),
    }


def save_tiny_pixel_model(directory: str | os.PathLike, **kwargs) -> Path:
    """Save :func:`build_tiny_pixel_model` in the diffusers folder layout (``model_index.json`` + subfolders, no vae)."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tokenizer_src:
        parts = build_tiny_pixel_model(tokenizer_src, **kwargs)
    index = {"_class_name": "PixelSpaceDiffusion", "_mmalign": "pixel"}
    for name, module in parts.items():
        module.save_pretrained(directory / name)
        index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return directory


def write_toy_preference_dataset(
    directory: str | os.PathLike,
    *,
    num_prompts: int = 8,
    chosen_per_prompt: int = 1,
    rejected_per_prompt: int = 1,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``data.jsonl`` + PNGs: per prompt, chosen images are bright noise textures, rejected ones dark.

    Returns the JSONL path. Rows: ``{"prompt": str, "chosen": [relative paths], "rejected": [relative paths]}``.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_index in range(num_prompts):
        row = {"prompt": f"a photo of object {prompt_index}", "chosen": [], "rejected": []}
        for side, count, level in (("chosen", chosen_per_prompt, 200), ("rejected", rejected_per_prompt, 55)):
            for member in range(count):
                pixels = rng.normal(level, 25, size=(image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
                relative = f"images/{prompt_index:04d}_{side}_{member}.png"
                Image.fromarray(pixels, mode="RGB").save(directory / relative)
                row[side].append(relative)
        rows.append(row)
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def margin_before_and_after_steps(model, batch: dict, optimizer, steps: int = 4, beta: float = 50.0):
    """``(before, after)``: the mean preference margin ``(ρ_w − ρ_l)`` of a preference model on ``batch`` (give it
    ``timesteps`` and ``noise``, so both read the same draws) around ``steps`` DPO steps of ``optimizer`` on it
    (the tests' "a few steps move the margin" check)."""
    import mmalign

    objective = mmalign.objective("dpo", beta=beta)

    def margin() -> float:
        with torch.no_grad():
            out = model(batch)
        return ((out.policy_chosen - out.ref_chosen) - (out.policy_rejected - out.ref_rejected)).mean().item()

    before = margin()
    for _ in range(steps):
        loss = objective(**model(batch).objective_inputs()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, margin()
