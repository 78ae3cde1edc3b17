"""Per-GPU memory of SDXL / SD3.5 / FLUX preference training at 1024 px: an ESTIMATE (docs/image.md).

1. Parameter counts: the real backbone, text-encoder and VAE architectures instantiated on the meta device (no
   weights, no memory) from their published config values; LoRA parameters counted after adding the recipes'
   adapters. Weights in bf16 (2 B/param), LoRA + its gradient + AdamW moments in fp32 (16 B/param).
2. Activations: a width-reduced proxy of each backbone (same block layout, 1/4 of the width, depth reduced for
   FLUX) runs mmalign's LoRA DPO step (one pair = 2 images, fp32, CPU) at two latent sizes, with and without
   gradient checkpointing; the peak live tensor bytes minus the bytes alive before the step are the activations.
   They are fitted linearly in latent tokens, extrapolated to 1024 px and scaled by the width (and depth) ratio,
   then halved for bf16. Assumes memory-efficient attention (no stored score matrices), as SDPA's flash /
   memory-efficient kernels on GPU, and activations linear in width: an estimate, not a GPU measurement.

    PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/image_memory_estimate.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

GIB = 2 ** 30
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD3_TARGETS = SDXL_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# family -> (backbone class, config, LoRA rank + targets of the recipe, text encoders, VAE latent channels)
FAMILIES = {
    "sdxl": ("UNet2DConditionModel", SDXL_UNET, 8, SDXL_TARGETS, ("clip_l", "clip_g"), 4),
    "sd3.5-medium": ("SD3Transformer2DModel", SD35M, 16, SD3_TARGETS, ("clip_l", "clip_g", "t5_xxl"), 16),
    "flux.1-dev": ("FluxTransformer2DModel", FLUX, 16, SDXL_TARGETS, ("clip_l", "t5_xxl"), 16),
}


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def text_encoder_params(name: str) -> int:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name == "t5_xxl":
        config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          feed_forward_proj="gated-gelu")
        return _meta_params(lambda: T5EncoderModel(config))
    width, layers, heads = (768, 12, 12) if name == "clip_l" else (1280, 32, 20)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, projection_dim=width)
    return _meta_params(lambda: CLIPTextModelWithProjection(config))


def vae_params(latent_channels: int) -> int:
    from diffusers import AutoencoderKL

    return _meta_params(lambda: AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2))


def backbone_counts(class_name: str, config: dict, rank: int, targets: list[str]) -> tuple[int, int]:
    import diffusers
    from peft import LoraConfig

    cls = getattr(diffusers, class_name)
    with torch.device("meta"):
        model = cls(**config)
        base = sum(p.numel() for p in model.parameters())
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora" in n)
    return base, lora


def proxy(family: str):
    """(backbone class, config, width factor, depth factor) of the width-reduced proxy."""
    if family == "sdxl":
        config = dict(SDXL_UNET, block_out_channels=(80, 160, 320), norm_num_groups=16, cross_attention_dim=512,
                      addition_time_embed_dim=64, projection_class_embeddings_input_dim=6 * 64 + 320)
        return "UNet2DConditionModel", config, 4.0, 1.0
    if family == "sd3.5-medium":
        config = dict(SD35M, num_attention_heads=6, joint_attention_dim=1024, caption_projection_dim=384,
                      pooled_projection_dim=512)
        return "SD3Transformer2DModel", config, 4.0, 1.0
    config = dict(FLUX, num_layers=5, num_single_layers=10, num_attention_heads=6, joint_attention_dim=1024,
                  pooled_projection_dim=192)
    return "FluxTransformer2DModel", config, 4.0, (19 + 38) / 15


def activation_bytes(family: str, latent: int, checkpointing: bool) -> float:
    """Peak live tensor bytes of a LoRA DPO step on the proxy beyond those alive before it (one pair)."""
    import diffusers

    import mmalign
    from mmalign.image.families import get_family
    from mmalign.image.families.model import FamilyPreferenceModel
    from mmalign.image.models import add_lora

    class_name, config, _, _ = proxy(family)
    torch.manual_seed(0)
    backbone = getattr(diffusers, class_name)(**config)
    if checkpointing:
        backbone.enable_gradient_checkpointing()
    add_lora(backbone, rank=FAMILIES[family][2], target_modules=FAMILIES[family][3])
    name = {"sdxl": "sdxl", "sd3.5-medium": "sd3", "flux.1-dev": "flux"}[family]
    text_width = config.get("cross_attention_dim") or config["joint_attention_dim"]
    pooled = config.get("pooled_projection_dim") or 320

    class Fixed(torch.nn.Module):  # cached text embeddings: 77 (CLIP) or 256 (T5) tokens
        def forward(self, prompts):
            n, tokens = len(prompts), 77 if name == "sdxl" else 256
            return {"states": torch.zeros(n, tokens, text_width), "pooled": torch.zeros(n, pooled)}

    channels = FAMILIES[family][5]
    if name == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    elif name == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    else:
        from diffusers import DDPMScheduler as Scheduler

    class Vae(torch.nn.Module):
        config = type("C", (), {"block_out_channels": (1, 2, 3, 4), "scaling_factor": 1.0, "shift_factor": 0.0})

    model = FamilyPreferenceModel(backbone, Scheduler(), Fixed(), Vae(), family=get_family(name)).train()
    batch = {"prompts": ["p"], "inputs": "latents", "chosen": torch.randn(1, 1, channels, latent, latent),
             "rejected": torch.randn(1, 1, channels, latent, latent)}
    objective = mmalign.objective("dpo", beta=1000.0)
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        objective(**model(batch).objective_inputs()).loss.backward()
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return float(peak)


def main() -> None:
    torch.set_num_threads(1)
    sizes = (16, 32)  # latent sides of the proxy measurements (128 and 256 px with an 8x VAE)
    target_latent = 128  # 1024 px
    results = {}
    for family, (class_name, config, rank, targets, encoders, latent_channels) in FAMILIES.items():
        base, lora = backbone_counts(class_name, config, rank, targets)
        encoder_params = {name: text_encoder_params(name) for name in encoders}
        vae = vae_params(latent_channels)
        _, _, width_factor, depth_factor = proxy(family)
        acts = {}
        for checkpointing in (False, True):
            small, large = (activation_bytes(family, side, checkpointing) for side in sizes)
            per_token = (large - small) / (sizes[1] ** 2 - sizes[0] ** 2)
            at_target = small + per_token * (target_latent ** 2 - sizes[0] ** 2)
            acts["checkpointing" if checkpointing else "plain"] = {
                "proxy_fp32_bytes": [small, large],
                "estimate_bf16_gib": at_target * width_factor * depth_factor / 2 / GIB}
        static = base * 2 + lora * 16  # bf16 base weights; fp32 LoRA weight + grad + 2 AdamW moments
        results[family] = {
            "backbone_params": base, "lora_params": lora, "lora_rank": rank, "text_encoder_params": encoder_params,
            "vae_params": vae, "backbone_bf16_plus_lora_adam_gib": static / GIB,
            "text_encoders_bf16_gib": sum(encoder_params.values()) * 2 / GIB, "vae_bf16_gib": vae * 2 / GIB,
            "activations_one_pair_1024px": acts}
        print(json.dumps({family: results[family]}, indent=1), flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "image_memory_estimate.json")
    if "--no-write" not in sys.argv:
        from mmalign.io import atomic_write_text

        atomic_write_text(out, json.dumps(results, indent=1) + "\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
