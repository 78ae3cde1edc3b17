"""Image section: Diffusion-DPO and mDPO (k = 4) steps on the SD 1.5 UNet layout (random weights, bf16, 512 px images
= 64×64 latents; SD 1.5's VAE and CLIP text-encoder shapes too): mmalign vs the two-UNet separate-forward loop vs the
diffusers example's loop — bench_image_dpo's variants, run here on the GPU — for each attention kernel (SDPA;
xformers when it imports) and gradient checkpointing off/on.

For each (attention, checkpointing) pass:
- memory: each variant built alone, ``torch.cuda.max_memory_allocated`` over building it (its reference copy,
  optimiser state) and ``memory_steps`` steps, minus what was allocated before (the shared VAE/text encoder/UNet);
- time: all variants built, then ``rounds`` interleaved rounds (every variant one step per round, after warmup);
  median seconds per step and images per second (policy images: 2 per pair, 2k per mDPO group).
The dry run uses bench_image_dpo's tiny pipeline on the CPU in float32 (memory: the process RSS, not comparable).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

from gpu_common import CaseLog, CaseRunner, median, peak_mib, pick_device, reset_peak, synchronize

K = 4
VARIANTS = ("mmalign_lora", f"mmalign_mdpo_k{K}", "naive_full", "naive_lora", "diffusers_lora", "diffusers_full",
            "mmalign_full")

# SD 1.5 (runwayml/stable-diffusion-v1-5) component configs, written out: nothing can be fetched on the GPU machine.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", norm_eps=1e-5,
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
                 mid_block_scale_factor=1)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


@dataclass
class ImageSettings:
    image_size: int
    pairs: int
    warmup: int
    rounds: int
    memory_steps: int
    dtype: str


# 2 prompts a step: 4 images per DPO forward, 16 for mDPO k=4 (all seven variants live at once in the timing pass).
GPU = ImageSettings(image_size=512, pairs=2, warmup=2, rounds=4, memory_steps=2, dtype="bfloat16")
DRY = ImageSettings(image_size=64, pairs=1, warmup=1, rounds=1, memory_steps=1, dtype="float32")


def build_sd15_parts(device, dtype) -> dict:
    """SD 1.5's UNet, VAE and CLIP text encoder layouts with random weights, built on ``device`` in ``dtype``;
    prompts tokenized by mmalign's offline character-level CLIP tokenizer padded to SD's 77 tokens."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmalign_adapter import clip_conditioner, clip_tokenizer

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = clip_tokenizer(tokenizer_dir, model_max_length=77)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=max(49408, len(tokenizer)), **SD15_TEXT,
                                                       bos_token_id=tokenizer.bos_token_id,
                                                       eos_token_id=tokenizer.eos_token_id,
                                                       pad_token_id=tokenizer.pad_token_id))
    finally:
        torch.set_default_dtype(previous)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return {"unet": unet, "vae": vae.requires_grad_(False).eval(), "scheduler": scheduler,
            "conditioner": clip_conditioner(tokenizer, text_encoder)}


def image_batch(pairs: int, k: int, size: int, device, dtype, seed: int = 0) -> dict:
    """``pairs`` prompts, each with k chosen and k rejected random images in [-1, 1] (the peers feed pixels to the
    VAE as they are, so they arrive in the VAE's dtype)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = [(torch.rand(pairs, k, 3, size, size, generator=generator) * 2 - 1).to(device=device, dtype=dtype)
              for _ in range(2)]
    return {"prompts": [f"a photo of object {i}" for i in range(pairs)], "chosen": images[0], "rejected": images[1]}


def group_size(name: str) -> int:
    return int(name.rsplit("k", 1)[1]) if name.startswith("mmalign_mdpo_k") else 1


def _on_device(name: str, device):
    # bench_image_dpo's peer loops draw their timesteps with torch.randint and no device (they were written for
    # the CPU); a device context puts those draws on the GPU as the diffusers example does, without editing them.
    return torch_device(device) if not name.startswith("mmalign") and device.type == "cuda" else contextlib.nullcontext()


def torch_device(device):
    import torch

    return torch.device(device)


def build_step(name: str, parts: dict, checkpointing: bool):
    from mmalign_adapter import image_step, policy_unet

    step = image_step(name, parts)
    unet = policy_unet(step)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    if any(getattr(m, "gradient_checkpointing", False) for m in unet.modules()) != checkpointing:
        raise RuntimeError(f"{name}: gradient checkpointing did not switch {'on' if checkpointing else 'off'}")
    return step


def measure_memory(name: str, parts: dict, batch: dict, settings: ImageSettings, checkpointing: bool, device) -> dict:
    from bench_text_dpo import current_rss_mib

    before = reset_peak(device)
    step = build_step(name, parts, checkpointing)
    with _on_device(name, device):
        for _ in range(settings.memory_steps):
            loss = step(batch)
    synchronize(device)
    result = {"peak_memory_mib": peak_mib(device, current_rss_mib()) - before, "allocated_before_mib": before,
              "loss": float(loss)}
    del step
    return result


def run_pass(attention: str, checkpointing: bool, parts: dict, settings: ImageSettings, device, runner: CaseRunner):
    import torch

    from mmalign_adapter import set_attention

    tag = f"{attention}/gc-{'on' if checkpointing else 'off'}"
    dtype = getattr(torch, settings.dtype)
    used = set_attention(parts["unet"], attention)  # the variants deep-copy this UNet
    if used != attention:
        raise RuntimeError(f"asked for {attention} attention, got {used}")
    batches = {name: image_batch(settings.pairs, group_size(name), settings.image_size, device, dtype)
               for name in VARIANTS}
    labels = dict(attention=attention, gradient_checkpointing=checkpointing)
    for name in VARIANTS:
        runner.run(f"memory/{tag}/{name}", "memory", lambda: measure_memory(
            name, parts, batches[name], settings, checkpointing, device), variant=name, **labels)

    def timing() -> dict:
        reset_peak(device)
        steps, failed = {}, {}
        for name in VARIANTS:
            try:
                steps[name] = build_step(name, parts, checkpointing)
            except Exception as err:  # noqa: BLE001 - this variant only (e.g. out of memory)
                failed[name] = f"build: {type(err).__name__}: {err}"[:1000]
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_index in range(settings.warmup + settings.rounds):
            for name in [n for n in steps if n not in failed]:
                synchronize(device)
                start = time.perf_counter()
                try:
                    with _on_device(name, device):
                        steps[name](batches[name])
                    synchronize(device)
                except Exception as err:  # noqa: BLE001 - drop this variant from the later rounds, keep the others
                    failed[name] = f"round {round_index + 1}: {type(err).__name__}: {err}"[:1000]
                    continue
                if round_index >= settings.warmup:
                    times[name].append(time.perf_counter() - start)
            if time.time() > runner.deadline_at:
                break  # out of time: keep the rounds already timed
        del steps
        variants = {name: {"step_times_s": values, "median_step_s": median(values),
                           "images_per_step": 2 * settings.pairs * group_size(name),
                           "images_per_s": 2 * settings.pairs * group_size(name) / median(values)}
                    for name, values in times.items() if name not in failed and values}
        if not variants:
            raise RuntimeError(f"no variant could be timed: {failed}")
        return {"variants": variants, "failed_variants": failed}

    runner.run(f"time/{tag}", "time", timing, **labels)


def run_section(dry_run: bool, log: CaseLog, deadline_at: float, dtype: str | None = None) -> None:
    import torch

    settings = DRY if dry_run else GPU
    if dtype:
        settings = replace(settings, dtype=dtype)
    device = pick_device(dry_run)
    runner = CaseRunner(log, deadline_at, "image")
    if dry_run:
        torch.set_num_threads(1)
        from bench_image_dpo import build_components

        parts = build_components(unet_channels=(32, 64))
        for module in (parts["unet"], parts["vae"], parts["conditioner"].text_encoder):
            module.to(getattr(torch, settings.dtype))
        attentions = ["sdpa"]
        log.write({"section": "image", "case": "xformers", "status": "skipped", "reason": "CPU dry run (CUDA only)"})
    else:
        parts = build_sd15_parts(device, getattr(torch, settings.dtype))
        attentions = ["sdpa"]
        try:
            import xformers  # noqa: F401
            import xformers.ops  # noqa: F401

            attentions.append("xformers")
        except Exception as err:  # noqa: BLE001 - a wheel that does not load on this torch/CUDA is a result too
            log.write({"section": "image", "case": "xformers", "status": "skipped",
                       "reason": f"xformers does not import: {type(err).__name__}: {err}"[:500]})
    log.write({"section": "image", "case": "model", "status": "info", "image_size": settings.image_size,
               "pairs_per_step": settings.pairs, "k": K, "dtype": settings.dtype,
               "unet_params": sum(p.numel() for p in parts["unet"].parameters()),
               "layout": "tiny SD layout (bench_image_dpo)" if dry_run else "SD 1.5 UNet/VAE/CLIP-L layouts"})
    for checkpointing in (False, True):
        for attention in attentions:
            try:
                run_pass(attention, checkpointing, parts, settings, device, runner)
            except Exception as err:  # noqa: BLE001 - this pass only
                log.write({"section": "image", "case": f"pass/{attention}/gc-{'on' if checkpointing else 'off'}",
                           "status": "error", "error": f"{type(err).__name__}: {err}"[:2000]})
