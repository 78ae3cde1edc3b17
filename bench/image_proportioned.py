"""``--shape proportioned`` of ``bench/image_family_bench.py``: SD3 / FLUX pipelines with the real models'
proportions at a CPU-feasible size (fixed from the real configs before any measurement, not tuned to a result).

Why: the tiny layouts (``--backbone-scale 4``) run head dimension 8/16 over 64 image + 272/512 text tokens, so the
joint attention, not the projections, is most of the step; at 1024 px the real models are the other way round.

What is kept from the real models (1024 px; ``6d/N`` = linear : attention multiply-adds per token and block, with
``d`` the hidden width and ``N`` = image + text tokens: ``12d²`` in the projections and MLP vs ``2Nd`` in
``QKᵀ`` and ``AV``):

| | image tokens | text tokens | heads × head dim = d | blocks | 6d/N |
|---|---|---|---|---|---|
| SD3-medium | 4096 (128² latents, patch 2) | 333 (77 CLIP + 256 T5) | 24 × 64 = 1536 | 24 | 2.08 |
| SD3.5-large | 4096 | 333 | 38 × 64 = 2432 | 38 | 3.29 |
| FLUX.1-dev | 4096 (2×2-packed 128² latents) | 512 (T5) | 24 × 128 = 3072 | 19 double + 38 single | 4.00 |
| here, SD3 | 256 (32² latents, patch 2) | 32 (16 CLIP + 16 T5) | 2 × 64 = 128 | 6 | 2.67 |
| here, FLUX | 256 (2×2-packed 32² latents) | 32 (T5) | 3 × 64 = 192 | 2 double + 4 single | 4.00 |

- head dimension 64 (FLUX's real 128 would leave one head at this width); image tokens 8× the text tokens (real:
  SD3 12.3×, FLUX 8×; SD3 keeps the tiny CLIP's 16 tokens, so its text share is larger than the real one's);
  16 latent channels (FLUX: 64 after packing), as both real VAEs.
- the VAE: 2 blocks (16, 32 channels), no mid-block attention, 64 px images -> 32² latents, so that encoding stays
  a small share of the step as at 1024 px (there one VAE encode is a few % of a training step).
- text encoders, tokenizers and schedulers: the tiny pipeline's (``mmalign.image.families.tiny``); T5 is cut to
  ``TEXT_T5_TOKENS[layout]`` tokens by the pipelines' own ``max_sequence_length``, in every loop alike.
"""

from __future__ import annotations

import tempfile

import torch

__all__ = ["build_proportioned_pipeline", "T5_TOKENS", "PROPORTIONED_LAYOUTS"]

PROPORTIONED_LAYOUTS = ("sd3", "flux")
T5_TOKENS = {"sd3": 16, "flux": 32}  # max_sequence_length: text tokens = 16 CLIP + 16 T5 (SD3), 32 T5 (FLUX)
_LATENT_SIZE = 32  # 64 px images, VAE downsampling 2x
_HEAD_DIM = 64


def _vae(seed: int, **factors):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=16, norm_num_groups=16, sample_size=2 * _LATENT_SIZE,
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False, **factors)


def _sd3_transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=_LATENT_SIZE, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=_HEAD_DIM,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=2 * _HEAD_DIM,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=_LATENT_SIZE)


def _flux_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=_HEAD_DIM,
        num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28))


def build_proportioned_pipeline(layout: str, seed: int = 0):
    """The tiny ``layout`` pipeline with the transformer and VAE above (random weights)."""
    from mmalign.image.families.tiny import build_tiny_pipeline

    if layout not in PROPORTIONED_LAYOUTS:
        raise ValueError(f"--shape proportioned: layout {layout!r} has no proportioned shape (one of "
                         f"{PROPORTIONED_LAYOUTS})")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_tiny_pipeline(layout, tokenizer_dir, seed=seed)
    components = dict(pipe.components)
    if layout == "sd3":
        components["transformer"] = _sd3_transformer(seed + 2)
        components["vae"] = _vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5305)
    else:
        components["transformer"] = _flux_transformer(seed + 2)
        components["vae"] = _vae(seed + 1, shift_factor=0.1159, scaling_factor=0.3611)
    return type(pipe)(**components)
