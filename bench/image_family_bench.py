"""The SDXL and flow-matching (SD3) layouts of ``bench/bench_image_dpo.py`` (``--layout sdxl|sd3``).

Tiny pipelines built from configs (``mmalign.image.families.tiny``), 64×64 images (16×16 latents), the same data,
AdamW, β_d = 5000 and threads for every variant:

- ``mmalign_lora`` / ``mmalign_full``: ``FamilyPreferenceModel`` + ``mmalign.objective("dpo")``; LoRA with the
  adapter-disabled reference, or full fine-tuning with a frozen copy.
- sdxl ``diffusers_lora``: the inner loop of the diffusers ``train_diffusion_dpo_sdxl.py`` example, re-written
  here: chosen ‖ rejected in ONE VAE encode, both CLIP encoders per step, ``add_time_ids`` per image, one t and ε
  per pair repeated for both halves, ONE policy UNet forward, ONE reference forward with the adapter disabled.
- sd3 ``flow_lora``: the same concatenated loop by rectified flow (σ from the logit-normal density on the
  scheduler's table, ``x = (1 − σ)x₀ + σε``, target ``ε − x₀``), reference = adapter disabled.
- ``twomodel_full`` (both layouts): the separate-forward loop with two backbones: full fine-tuning, a frozen
  reference copy, chosen and rejected encoded separately and four separate backbone forwards.

Each baseline's noise, conditioning and backbone call are written out here, not taken from mmalign.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F
from bench_image_dpo import MmalignStep

BETA_D = 5000.0
FAMILY_VARIANTS = {
    "sdxl": ("diffusers_lora", "twomodel_full", "mmalign_full", "mmalign_lora"),
    "sd3": ("flow_lora", "twomodel_full", "mmalign_full", "mmalign_lora"),
}
# (label, reference variant, variant): speed ratios are reference / variant (> 1: the variant is faster)
SPEED_PAIRS = {
    "sdxl": (("speed, same mode, LoRA: diffusers_lora / mmalign_lora", "diffusers_lora", "mmalign_lora"),
             ("speed, issue goal >= 1.2: twomodel_full / mmalign_lora", "twomodel_full", "mmalign_lora"),
             ("speed, same mode, full: twomodel_full / mmalign_full", "twomodel_full", "mmalign_full")),
    "sd3": (("speed, same mode, LoRA: flow_lora / mmalign_lora", "flow_lora", "mmalign_lora"),
            ("speed, issue goal >= 1.2: twomodel_full / mmalign_lora", "twomodel_full", "mmalign_lora"),
            ("speed, same mode, full: twomodel_full / mmalign_full", "twomodel_full", "mmalign_full")),
}
# (label, numerator, denominator): peak tensor memory ratios
MEMORY_PAIRS = {
    "sdxl": (("memory, issue goal <= 0.7: mmalign_lora / twomodel_full", "mmalign_lora", "twomodel_full"),
             ("memory, same mode, LoRA: mmalign_lora / diffusers_lora", "mmalign_lora", "diffusers_lora")),
    "sd3": (("memory, issue goal <= 0.7: mmalign_lora / twomodel_full", "mmalign_lora", "twomodel_full"),
            ("memory, same mode, LoRA: mmalign_lora / flow_lora", "mmalign_lora", "flow_lora")),
}


def build_parts(layout: str, seed: int = 0, sd3_scale: int = 1) -> dict:
    from mmalign.image.families.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_tiny_pipeline(layout, tokenizer_dir, seed=seed, sd3_scale=sd3_scale)
    pipe.vae.requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).eval()
    return {"pipe": pipe, "layout": layout}


def make_batch(pairs: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"prompts": [f"object {i}" for i in range(pairs)],
            "chosen": torch.rand(pairs, 1, 3, 64, 64, generator=generator) * 2 - 1,
            "rejected": torch.rand(pairs, 1, 3, 64, 64, generator=generator) * 2 - 1}


class MmalignFamilyStep(MmalignStep):
    """mmalign's step (the SD bench's ``__call__``) on a family pipeline."""

    def __init__(self, parts: dict, finetuning: str):  # not super().__init__(): that builds an SD model
        import mmalign
        from mmalign.image.families import get_family
        from mmalign.image.families.conditioning import PipelinePromptEncoder
        from mmalign.image.families.model import FamilyPreferenceModel
        from mmalign.image.models import add_lora, frozen_copy

        pipe, family = parts["pipe"], get_family(parts["layout"])
        backbone = copy.deepcopy(getattr(pipe, family.backbone_name))
        reference = None
        if finetuning == "lora":
            add_lora(backbone, rank=8)
        else:
            reference = frozen_copy(backbone)
            backbone.requires_grad_(True)
        encoders = {name: getattr(pipe, name) for name in family.encoder_names}
        tokenizers = {family.tokenizer_for(name): getattr(pipe, family.tokenizer_for(name)) for name in encoders}
        conditioner = PipelinePromptEncoder(family.name, family.pipeline_class, encoders, tokenizers, backbone)
        if family.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.model = FamilyPreferenceModel(backbone, scheduler, conditioner, pipe.vae, reference, family=family)
        self.model.train()
        self.objective = mmalign.objective("dpo", beta=BETA_D / 2)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)


class BaselineStep:
    """The hand-written loops: ``concatenated`` (one encode, one policy + one reference forward; LoRA with the
    adapter disabled) or two backbones with four separate forwards (full fine-tuning)."""

    def __init__(self, parts: dict, concatenated: bool):
        from mmalign.image.models import add_lora

        self.pipe, self.layout, self.concatenated = parts["pipe"], parts["layout"], concatenated
        base = self.pipe.unet if self.layout == "sdxl" else self.pipe.transformer
        self.backbone = copy.deepcopy(base)
        if concatenated:
            add_lora(self.backbone, rank=8)
            self.reference = None
        else:
            self.reference = copy.deepcopy(base).requires_grad_(False).eval()
        self.backbone.train()
        self.vae = self.pipe.vae
        if self.layout == "sdxl":
            from diffusers import DDPMScheduler

            self.ddpm = DDPMScheduler.from_config(self.pipe.scheduler.config)
        else:
            self.sigma_table = self.pipe.scheduler.sigmas.clone()  # σ per training index (shifted), before sampling
        self.optimizer = torch.optim.AdamW([p for p in self.backbone.parameters() if p.requires_grad], lr=1e-5)

    # --- the three things a layout changes
    def _encode(self, prompts):
        with torch.no_grad():
            if self.layout == "sdxl":
                states, _, pooled, _ = self.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
                ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(len(prompts), 1)  # per image
                return {"states": states, "pooled": pooled, "time_ids": ids}
            states, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device="cpu",
                                                           do_classifier_free_guidance=False)
            return {"states": states, "pooled": pooled}

    def _noise(self, latents, noise, pairs):
        if self.layout == "sdxl":
            t = torch.randint(0, self.ddpm.config.num_train_timesteps, (pairs,)).repeat(latents.shape[0] // pairs)
            return t, self.ddpm.add_noise(latents, noise, t), noise
        index = (torch.sigmoid(torch.randn(pairs)) * len(self.sigma_table)).long().clamp(max=len(self.sigma_table) - 1)
        sigma = self.sigma_table[index].repeat(latents.shape[0] // pairs).view(-1, 1, 1, 1)
        return sigma.flatten() * 1000, (1 - sigma) * latents + sigma * noise, noise - latents

    def _forward(self, model, noisy, t, cond):
        if self.layout == "sdxl":
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
            return model(noisy, t, encoder_hidden_states=cond["states"], added_cond_kwargs=added).sample
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["states"],
                     pooled_projections=cond["pooled"]).sample

    def _reference(self, noisy, t, cond):
        with torch.no_grad():
            if self.reference is not None:
                return self._forward(self.reference, noisy, t, cond)
            self.backbone.disable_adapters()
            try:
                return self._forward(self.backbone, noisy, t, cond)
            finally:
                self.backbone.enable_adapters()

    def _latents(self, pixels):
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def __call__(self, batch):
        pairs = len(batch["prompts"])
        cond = self._encode(batch["prompts"])
        if self.concatenated:
            latents = self._latents(torch.cat([batch["chosen"][:, 0], batch["rejected"][:, 0]]))
            noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
            t, noisy, target = self._noise(latents, noise, pairs)
            cond2 = {key: value.repeat(2, *([1] * (value.ndim - 1))) for key, value in cond.items()}
            model = F.mse_loss(self._forward(self.backbone, noisy, t, cond2), target, reduction="none").mean((1, 2, 3))
            ref = F.mse_loss(self._reference(noisy, t, cond2), target, reduction="none").mean((1, 2, 3))
            (model_w, model_l), (ref_w, ref_l) = model.chunk(2), ref.chunk(2)
        else:
            latents_w, latents_l = self._latents(batch["chosen"][:, 0]), self._latents(batch["rejected"][:, 0])
            noise = torch.randn_like(latents_w)
            t, noisy_w, target_w = self._noise(latents_w, noise, pairs)
            if self.layout == "sdxl":
                noisy_l, target_l = self.ddpm.add_noise(latents_l, noise, t), noise
            else:  # the same σ = t / 1000 for the rejected image
                sigma = (t / 1000).view(-1, 1, 1, 1)
                noisy_l, target_l = (1 - sigma) * latents_l + sigma * noise, noise - latents_l
            errors = []
            for noisy, target in ((noisy_w, target_w), (noisy_l, target_l)):
                errors.append(F.mse_loss(self._reference(noisy, t, cond), target, reduction="none").mean((1, 2, 3)))
            for noisy, target in ((noisy_w, target_w), (noisy_l, target_l)):
                errors.append(F.mse_loss(self._forward(self.backbone, noisy, t, cond), target,
                                         reduction="none").mean((1, 2, 3)))
            ref_w, ref_l, model_w, model_l = errors
        loss = -F.logsigmoid(-0.5 * BETA_D * ((model_w - model_l) - (ref_w - ref_l))).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_family_step(name: str, parts: dict):
    if name.startswith("mmalign_"):
        return MmalignFamilyStep(parts, name.split("_")[1])
    return BaselineStep(parts, concatenated=name != "twomodel_full")


def backbone_params(parts: dict) -> int:
    pipe = parts["pipe"]
    return sum(p.numel() for p in (pipe.unet if parts["layout"] == "sdxl" else pipe.transformer).parameters())


def family_main(args) -> None:
    """Timing (interleaved rounds, in this process) and peak tensor memory (fresh processes) of one layout."""
    import json
    import os
    import statistics
    import subprocess
    import sys
    import time

    from bench_image_dpo import time_rounds
    from mmalign.io import atomic_write_text

    layout, variants = args.layout, FAMILY_VARIANTS[args.layout]
    load_before = os.getloadavg()
    torch.manual_seed(0)
    parts = build_parts(layout, sd3_scale=args.sd3_scale)
    steps = {name: make_family_step(name, parts) for name in variants}
    batch = make_batch(args.pairs)
    times = time_rounds(steps, {name: batch for name in variants}, variants, args.warmup, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    tensor_runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.memory_repeats):
        for name in variants:
            result = subprocess.run(
                [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_image_dpo.py"),
                 "--layout", layout, "--memory-variant", name, "--memory-measure", "tensor", "--threads",
                 str(args.threads), "--pairs", str(args.pairs), "--memory-steps", str(args.memory_steps),
                 "--sd3-scale", str(args.sd3_scale)],
                capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), check=True)
            tensor_runs[name].append(json.loads(result.stdout.strip().splitlines()[-1])["peak_tensor_mb"])
    tensor = {name: statistics.median(values) for name, values in tensor_runs.items()}
    ratios = {}
    for label, slow, fast in SPEED_PAIRS[layout]:
        ratios[label + " (ratio of medians)"] = medians[slow] / medians[fast]
        ratios[label + " (median per-round ratio)"] = statistics.median(a / b for a, b in zip(times[slow], times[fast]))
    for label, numerator, denominator in MEMORY_PAIRS[layout]:
        ratios[label + " (peak tensor memory)"] = tensor[numerator] / tensor[denominator]
    load_after = os.getloadavg()
    print(f"\ntiny {layout}: backbone {backbone_params(parts) / 1e6:.2f}M params, 64x64 images (16x16 latents), "
          f"{args.pairs} prompts/step, {args.threads} threads, {args.rounds} rounds, float32, torch {torch.__version__}, "
          f"load average before/after {load_before} / {load_after}")
    print("| variant | median s/step | min s/step | peak tensor memory (MB) |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} | {tensor[name]:.1f} |")
    for label, value in ratios.items():
        print(f"- {label}: {value:.2f}")
    suffix = f"_{layout}" + (f"_x{args.sd3_scale}" if layout == "sd3" and args.sd3_scale != 1 else "")
    path = args.json if args.json != args.default_json else args.default_json.replace(".json", f"{suffix}.json")
    results = {"layout": layout, "medians_s": medians, "times_s": times, "peak_tensor_memory_mb": tensor,
               "tensor_runs": tensor_runs, "ratios": ratios, "backbone_params": backbone_params(parts),
               "args": {k: v for k, v in vars(args).items() if k != "default_json"}, "torch": torch.__version__,
               "load_average_before": load_before, "load_average_after": load_after,
               "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    print(f"raw results: {path}")
