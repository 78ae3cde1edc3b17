"""The SDXL and flow-matching (SD3, FLUX) layouts of ``bench/bench_image_dpo.py`` (``--layout sdxl|sd3|flux``).

Tiny pipelines built from configs (``mmalign.image.families.tiny``), 64×64 images (16×16 latents), the same data,
AdamW, β_d = 5000 and threads for every variant:

- ``mmalign_lora`` / ``mmalign_full``: ``FamilyPreferenceModel`` + ``mmalign.objective("dpo")``; LoRA with the
  adapter-disabled reference, or full fine-tuning with a frozen copy; as ``mmalign.image.train`` runs it: the
  direct LoRA forward (``lora.direct_forward``, default on) and the engine's AdamW (``build_adamw``: torch's
  fused kernel on CPU).
- sd3 / flux ``mmalign_lora_peft``: ``mmalign_lora`` without those two (peft's LoRA forward, the default
  per-tensor ``torch.optim.AdamW`` of the baselines): what the fast paths are worth, in the same run.
- sdxl ``diffusers_lora``: the inner loop of the diffusers ``train_diffusion_dpo_sdxl.py`` example, re-written
  here: chosen ‖ rejected in ONE VAE encode, both CLIP encoders per step, ``add_time_ids`` per image, one t and ε
  per pair repeated for both halves, ONE policy UNet forward, ONE reference forward with the adapter disabled.
- sd3 / flux ``flow_lora``: the same concatenated loop by rectified flow (σ from the logit-normal density on the
  scheduler's table, ``x = (1 − σ)x₀ + σε``, target ``ε − x₀``), reference = adapter disabled; FLUX on 2×2-packed
  latents with image/text ids, ``t/1000`` and the guidance embedding, as ``FluxPipeline`` calls it.
- ``twomodel_full`` (both layouts): the separate-forward loop with two backbones: full fine-tuning, a frozen
  reference copy, chosen and rejected encoded separately and four separate backbone forwards.

Each baseline's noise, conditioning and backbone call are written out here, not taken from mmalign.

``--cache-text``: every loop encodes the step's prompts once before timing (mmalign: ``cache_text_embeddings``,
the encoders' outputs looked up per step; baselines: the same lookup written out), so the step measures the VAE
and backbone work, not the text encoders that dominate the tiny layouts.

``--shape proportioned`` (sd3 / flux): the transformer and VAE of ``bench/image_proportioned.py`` (the real models'
proportions: head dimension 64, 256 image vs 32 text tokens, hidden width to tokens as at 1024 px), T5 cut to its
text length by ``max_sequence_length`` in every loop; nothing else changes.
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
    "sd3": ("flow_lora", "twomodel_full", "mmalign_full", "mmalign_lora", "mmalign_lora_peft"),
    "flux": ("flow_lora", "twomodel_full", "mmalign_full", "mmalign_lora", "mmalign_lora_peft"),
}
# (label, reference variant, variant): speed ratios are reference / variant (> 1: the variant is faster)
SPEED_PAIRS = {
    "sdxl": (("speed, same mode, LoRA: diffusers_lora / mmalign_lora", "diffusers_lora", "mmalign_lora"),
             ("speed, issue goal >= 1.2: twomodel_full / mmalign_lora", "twomodel_full", "mmalign_lora"),
             ("speed, same mode, full: twomodel_full / mmalign_full", "twomodel_full", "mmalign_full")),
    "sd3": (("speed, same mode, LoRA: flow_lora / mmalign_lora", "flow_lora", "mmalign_lora"),
            ("speed, issue goal >= 1.2: twomodel_full / mmalign_lora", "twomodel_full", "mmalign_lora"),
            ("speed, same mode, full: twomodel_full / mmalign_full", "twomodel_full", "mmalign_full"),
            ("speed, fast paths' worth: mmalign_lora_peft / mmalign_lora", "mmalign_lora_peft", "mmalign_lora"),
            ("speed, without them: twomodel_full / mmalign_lora_peft", "twomodel_full", "mmalign_lora_peft")),
}
SPEED_PAIRS["flux"] = SPEED_PAIRS["sd3"]
# (label, numerator, denominator): peak tensor memory ratios
MEMORY_PAIRS = {
    "sdxl": (("memory, issue goal <= 0.7: mmalign_lora / twomodel_full", "mmalign_lora", "twomodel_full"),
             ("memory, same mode, LoRA: mmalign_lora / diffusers_lora", "mmalign_lora", "diffusers_lora")),
    "sd3": (("memory, issue goal <= 0.7: mmalign_lora / twomodel_full", "mmalign_lora", "twomodel_full"),
            ("memory, same mode, LoRA: mmalign_lora / flow_lora", "mmalign_lora", "flow_lora")),
}
MEMORY_PAIRS["flux"] = MEMORY_PAIRS["sd3"]


def add_arguments(parser) -> None:
    parser.add_argument("--backbone-scale", "--sd3-scale", dest="backbone_scale", type=int, default=1,
                        help="sd3/flux: multiply the tiny transformer's layers/heads")
    parser.add_argument("--cache-text", action="store_true",
                        help="sdxl/sd3/flux: every loop looks up text embeddings computed once (encoders off the step)")
    parser.add_argument("--shape", choices=("tiny", "proportioned"), default="tiny",
                        help="sd3/flux: proportioned = the real models' proportions (bench/image_proportioned.py)")


def memory_setup(args):
    """``(parts, batch, make_step)`` of a fresh memory-measuring process."""
    parts = build_parts(args.layout, backbone_scale=args.backbone_scale, cache_text=args.cache_text, shape=args.shape)
    return parts, make_batch(args.pairs), make_family_step


def build_parts(layout: str, seed: int = 0, backbone_scale: int = 1, cache_text: bool = False,
                shape: str = "tiny") -> dict:
    from mmalign.image.families.tiny import build_tiny_pipeline

    max_sequence_length = None  # the pipelines' default T5 length
    if shape == "proportioned":
        from image_proportioned import T5_TOKENS, build_proportioned_pipeline

        if backbone_scale != 1:
            raise ValueError("--shape proportioned fixes the backbone; leave --backbone-scale at 1")
        pipe, max_sequence_length = build_proportioned_pipeline(layout, seed), T5_TOKENS[layout]
    else:
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            pipe = build_tiny_pipeline(layout, tokenizer_dir, seed=seed, backbone_scale=backbone_scale)
    pipe.vae.requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).eval()
    return {"pipe": pipe, "layout": layout, "cache_text": cache_text, "max_sequence_length": max_sequence_length}


PROMPTS = [f"object {i}" for i in range(16)]  # every prompt a step may use (the text-embedding caches hold them)


def make_batch(pairs: int, seed: int = 0) -> dict:
    if pairs > len(PROMPTS):
        raise ValueError(f"--pairs {pairs}: at most {len(PROMPTS)}")
    generator = torch.Generator().manual_seed(seed)
    return {"prompts": PROMPTS[:pairs],
            "chosen": torch.rand(pairs, 1, 3, 64, 64, generator=generator) * 2 - 1,
            "rejected": torch.rand(pairs, 1, 3, 64, 64, generator=generator) * 2 - 1}


class MmalignFamilyStep(MmalignStep):
    """mmalign's step (the SD bench's ``__call__``) on a family pipeline."""

    def __init__(self, parts: dict, finetuning: str, fast_paths: bool = True):  # not super().__init__() (SD)
        import mmalign
        from mmalign.image.families import get_family
        from mmalign.image.families.conditioning import PipelinePromptEncoder
        from mmalign.image.families.model import FamilyPreferenceModel
        from mmalign.engine.optim import build_adamw
        from mmalign.engine.sections import LoraConfig
        from mmalign.image.models import apply_finetuning

        pipe, family = parts["pipe"], get_family(parts["layout"])
        backbone = copy.deepcopy(getattr(pipe, family.backbone_name))
        # the library's own set-up (mmalign.image.models.apply_finetuning), rank 8 on to_q/k/v/out.0, scale 1
        lora = LoraConfig(enabled=finetuning == "lora", r=8, alpha=None, dropout=0.0,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0"], direct_forward=fast_paths)
        reference = apply_finetuning(backbone, lora)
        encoders = {name: getattr(pipe, name) for name in family.encoder_names}
        tokenizers = {family.tokenizer_for(name): getattr(pipe, family.tokenizer_for(name)) for name in encoders}
        conditioner = PipelinePromptEncoder(family.name, family.pipeline_class, encoders, tokenizers, backbone,
                                            max_sequence_length=parts["max_sequence_length"])
        if family.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.model = FamilyPreferenceModel(backbone, scheduler, conditioner, pipe.vae, reference, family=family)
        if parts["cache_text"]:
            self.model.cache_text_embeddings(PROMPTS)
        self.model.train()
        self.objective = mmalign.objective("dpo", beta=BETA_D / 2)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if fast_paths:  # the engine's optimiser (mmalign.engine.trainer): fused AdamW, weight decay 0.01 as torch's
            self.optimizer = build_adamw(params, _AdamwSettings())
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5)


class _AdamwSettings:
    """The training-config fields ``build_adamw`` reads, set to torch's AdamW defaults at lr 1e-5 (the baselines')."""

    learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 1e-5, 0.9, 0.999, 1e-8, 0.01


class BaselineStep:
    """The hand-written loops: ``concatenated`` (one encode, one policy + one reference forward; LoRA with the
    adapter disabled) or two backbones with four separate forwards (full fine-tuning)."""

    def __init__(self, parts: dict, concatenated: bool):
        from mmalign.image.models import add_lora

        self.pipe, self.layout, self.concatenated = parts["pipe"], parts["layout"], concatenated
        length = parts["max_sequence_length"]
        self.t5_length = {} if length is None else {"max_sequence_length": length}
        base = backbone_of(parts)
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
        # --cache-text: the prompts' embeddings computed once, looked up per step (as mmalign's cache does)
        self.text_cache = None
        if parts["cache_text"]:
            encoded = self._encode_text(PROMPTS)
            self.text_cache = {p: {k: v[i] for k, v in encoded.items()} for i, p in enumerate(PROMPTS)}
        self.optimizer = torch.optim.AdamW([p for p in self.backbone.parameters() if p.requires_grad], lr=1e-5)

    # --- the three things a layout changes
    def _encode_text(self, prompts):
        with torch.no_grad():
            if self.layout == "sdxl":
                states, _, pooled, _ = self.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            elif self.layout == "flux":
                states, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device="cpu", **self.t5_length)
            else:
                states, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device="cpu",
                                                               do_classifier_free_guidance=False, **self.t5_length)
        return {"states": states, "pooled": pooled}

    def _encode(self, prompts):
        if self.text_cache is None:
            cond = self._encode_text(prompts)
        else:
            cond = {key: torch.stack([self.text_cache[p][key] for p in prompts]) for key in ("states", "pooled")}
        if self.layout == "sdxl":
            cond["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(len(prompts), 1)  # per image
        return cond

    def _noise(self, latents, noise, pairs):
        if self.layout == "sdxl":
            t = torch.randint(0, self.ddpm.config.num_train_timesteps, (pairs,)).repeat(latents.shape[0] // pairs)
            return t, self.ddpm.add_noise(latents, noise, t), noise
        index = (torch.sigmoid(torch.randn(pairs)) * len(self.sigma_table)).long().clamp(max=len(self.sigma_table) - 1)
        sigma = self.sigma_table[index].repeat(latents.shape[0] // pairs).view(-1, 1, 1, 1)
        return sigma.flatten() * 1000, (1 - sigma) * latents + sigma * noise, noise - latents

    def _forward(self, model, noisy, t, cond):
        """The backbone's prediction in the target's layout (FLUX: packed, see :meth:`_target`)."""
        if self.layout == "sdxl":
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
            return model(noisy, t, encoder_hidden_states=cond["states"], added_cond_kwargs=added).sample
        if self.layout == "flux":
            from diffusers import FluxPipeline

            count, channels, height, width = noisy.shape
            packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
            image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, noisy.device,
                                                               noisy.dtype)
            text_ids = torch.zeros(cond["states"].shape[1], 3)
            guidance = torch.ones(count) if model.config.guidance_embeds else None
            return model(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=cond["pooled"],
                         encoder_hidden_states=cond["states"], txt_ids=text_ids, img_ids=image_ids).sample
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["states"],
                     pooled_projections=cond["pooled"]).sample

    def _target(self, target):
        if self.layout != "flux":
            return target
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(target, *target.shape)

    def _error(self, prediction, target):
        return F.mse_loss(prediction, self._target(target), reduction="none").flatten(1).mean(1)

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
            model = self._error(self._forward(self.backbone, noisy, t, cond2), target)
            ref = self._error(self._reference(noisy, t, cond2), target)
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
                errors.append(self._error(self._reference(noisy, t, cond), target))
            for noisy, target in ((noisy_w, target_w), (noisy_l, target_l)):
                errors.append(self._error(self._forward(self.backbone, noisy, t, cond), target))
            ref_w, ref_l, model_w, model_l = errors
        loss = -F.logsigmoid(-0.5 * BETA_D * ((model_w - model_l) - (ref_w - ref_l))).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_family_step(name: str, parts: dict):
    if name.startswith("mmalign_"):
        return MmalignFamilyStep(parts, name.split("_")[1], fast_paths=not name.endswith("_peft"))
    return BaselineStep(parts, concatenated=name != "twomodel_full")


def backbone_of(parts: dict):
    return parts["pipe"].unet if parts["layout"] == "sdxl" else parts["pipe"].transformer


def backbone_params(parts: dict) -> int:
    return sum(p.numel() for p in backbone_of(parts).parameters())


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
    parts = build_parts(layout, backbone_scale=args.backbone_scale, cache_text=args.cache_text, shape=args.shape)
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
                 "--backbone-scale", str(args.backbone_scale), "--shape", args.shape]
                + (["--cache-text"] if args.cache_text else []),
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
    latent = "32x32 latents, 256 image + 32 text tokens" if args.shape == "proportioned" else "16x16 latents"
    print(f"\n{args.shape} {layout}: backbone {backbone_params(parts) / 1e6:.2f}M params, 64x64 images ({latent}), "
          f"{args.pairs} prompts/step, text embeddings {'cached' if args.cache_text else 'encoded per step'}, "
          f"{args.threads} threads, {args.rounds} rounds, float32, torch {torch.__version__}, "
          f"load average before/after {load_before} / {load_after}")
    print("| variant | median s/step | min s/step | peak tensor memory (MB) |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} | {tensor[name]:.1f} |")
    for label, value in ratios.items():
        print(f"- {label}: {value:.2f}")
    suffix = (f"_{layout}" + (f"_x{args.backbone_scale}" if args.backbone_scale != 1 else "")
              + ("_proportioned" if args.shape == "proportioned" else "")
              + ("_cached_text" if args.cache_text else ""))
    path = args.json if args.json != args.default_json else args.default_json.replace(".json", f"{suffix}.json")
    results = {"layout": layout, "medians_s": medians, "times_s": times, "peak_tensor_memory_mb": tensor,
               "tensor_runs": tensor_runs, "ratios": ratios, "backbone_params": backbone_params(parts),
               "args": {k: v for k, v in vars(args).items() if k != "default_json"}, "torch": torch.__version__,
               "load_average_before": load_before, "load_average_after": load_after,
               "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    print(f"raw results: {path}")
