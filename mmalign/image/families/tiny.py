"""Tiny SDXL / SD3 / FLUX pipelines built from configs (random weights, tokenizers generated in code) for tests,
benchmarks and offline smoke runs. Same component layout as the real pipelines, so the same loading code runs.

Latents: 64 px images -> 16 x 16 latents (VAE downsampling 4x). Text: character-level CLIP tokenizers (width 32),
a character-level T5 tokenizer and a 1-layer T5 encoder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["build_tiny_pipeline", "save_tiny_pipeline", "build_tiny_t5_tokenizer", "TINY_FAMILIES"]

TINY_FAMILIES = ("sdxl", "sd3", "flux")
_CLIP_WIDTH = 32
_T5_WIDTH = 64


def build_tiny_t5_tokenizer():
    """A character-level ``T5TokenizerFast`` (Unigram over printable ASCII), built without a hub."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(32, 127)] + [("▁", -1.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=32)


def _clip(tokenizer, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=_CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            projection_dim=_CLIP_WIDTH, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                            pad_token_id=vocab - 1, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, image_size: int, seed: int, **flow_factors):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=latent_channels, norm_num_groups=32, sample_size=image_size, **flow_factors)


def build_tiny_pipeline(family: str, tokenizer_dir: str | os.PathLike, *, image_size: int = 64,
                        prediction_type: str = "epsilon", use_t5: bool = True, seed: int = 0, backbone_scale: int = 1):
    """A randomly initialised pipeline of ``family`` (``sdxl``, ``sd3`` or ``flux``). ``backbone_scale``
    multiplies the SD3 / FLUX transformer's layers and heads (SD3 1: 0.08M parameters, 4: 4.7M; for benchmarks where
    the backbone matters)."""
    from mmalign.image.testing import build_tiny_clip_tokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny family {family!r}: expected one of {TINY_FAMILIES}")
    tokenizer_dir = Path(tokenizer_dir)
    clip_tokenizer = build_tiny_clip_tokenizer(tokenizer_dir / "clip")
    latent_size = image_size // 4
    if family == "sdxl":
        return _tiny_sdxl(clip_tokenizer, image_size, latent_size, prediction_type, seed)
    if family == "sd3":
        return _tiny_sd3(clip_tokenizer, image_size, latent_size, use_t5, seed, backbone_scale)
    return _tiny_flux(clip_tokenizer, image_size, latent_size, seed, backbone_scale)


def _tiny_sdxl(tokenizer, image_size, latent_size, prediction_type, seed):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _CLIP_WIDTH, attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + _CLIP_WIDTH, transformer_layers_per_block=(1, 1))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=prediction_type,
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_vae(4, image_size, seed + 1, force_upcast=True), text_encoder=_clip(tokenizer, seed, False),
        text_encoder_2=_clip(tokenizer, seed + 3, True), tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)


def _tiny_sd3(tokenizer, image_size, latent_size, use_t5, seed, scale=1):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, num_layers=2 * scale, attention_head_dim=8,
        num_attention_heads=4 * scale, joint_attention_dim=_T5_WIDTH, caption_projection_dim=32 * scale,
        pooled_projection_dim=2 * _CLIP_WIDTH, out_channels=16, pos_embed_max_size=latent_size)
    t5_tokenizer = build_tiny_t5_tokenizer() if use_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(16, image_size, seed + 1, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                 use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, seed, True), tokenizer=tokenizer, text_encoder_2=_clip(tokenizer, seed + 3, True),
        tokenizer_2=tokenizer, text_encoder_3=_t5(t5_tokenizer, seed + 4) if use_t5 else None,
        tokenizer_3=t5_tokenizer)


def _tiny_flux(tokenizer, image_size, latent_size, seed, scale=1):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=scale, num_single_layers=scale, attention_head_dim=16,
        num_attention_heads=2 * scale, joint_attention_dim=_T5_WIDTH, pooled_projection_dim=_CLIP_WIDTH,
        guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    t5_tokenizer = build_tiny_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
                                                max_image_seq_len=256)
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(4, image_size, seed + 1, shift_factor=0.1159, scaling_factor=0.3611,
                                      use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, seed, False), tokenizer=tokenizer, text_encoder_2=_t5(t5_tokenizer, seed + 4),
        tokenizer_2=t5_tokenizer, transformer=transformer)


def save_tiny_pipeline(family: str, directory: str | os.PathLike, **kwargs) -> Path:
    """:func:`build_tiny_pipeline` saved with ``save_pretrained`` to ``directory``; returns the path."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tokenizer_src:
        build_tiny_pipeline(family, tokenizer_src, **kwargs).save_pretrained(directory)
    return directory
