"""Does mmalign's image DPO steer what the model SAMPLES? A bright-vs-dark contrast on a pretrained tiny UNet.

Online rounds on the random tiny pixel-space UNet did not measurably steer the brightness of its samples, and a
random tiny UNet's samples carry almost no brightness variance to steer (docs/image.md, "Known limits"). This
experiment gives the preference something to act on:

1. **Start.** The tiny pixel-space UNet of :func:`mmalign.image.testing.save_tiny_pixel_model` (16 px, ~1.4M
   parameters), first **pretrained by plain denoising** (ε-prediction MSE, uniform t, the model's DDPM scheduler)
   on generated 16 px images whose brightness is spread over 40–215 (a flat level with a colour tint, a gradient
   and pixel noise), so that its samples vary in brightness. Pretrained once (``--pretrain-seed``) and saved in
   the diffusers folder layout under ``<work-dir>/start-pretrained``; reused when its settings file matches.
2. **Two offline DPO runs per seed from that same start**, through the library API ``mmalign.image.train``
   (Diffusion-DPO; preset ``v2``: full fine-tuning, a frozen copy of the start as the reference; ``first-guess``:
   LoRA, the adapter-disabled reference): pairs of two generated images of the same distribution, the
   *bright* run prefers the brighter image of each pair, the *dark* run the darker one: the same pairs with
   chosen and rejected swapped, the same seed (LoRA init, data order, t and ε draws).
3. **Sampling.** Each trained model samples held-out images (fixed seeds 10000.., never used in training; DDIM
   from the model's DDPM scheduler config, no guidance) and the mean pixel level (0–255) of those images is its
   brightness. **contrast = bright-run brightness − dark-run brightness.**
4. **Control.** The same two runs from the random (not pretrained) tiny UNet (``--start random``).
5. **Online rounds** (``--method online``, optional): instead of the generated pairs, ``mmalign.image.online``
   rounds from the same start (k images per prompt from the policy, mDPO on the top vs bottom half by the reward
   +brightness or −brightness); contrast and rule as above, on the held-out brightness after the last round.

A seed sets the preference pairs, the (LoRA) initialisation, the data order and the training noise; the start
model and the held-out sampling seeds are the same for every seed (so the seeds do not cover the pretraining's own
variance).

**Analysis rule (unchanged since session 13; seeds are the unit).** For a start, over seeds 0–4, the check PASSES
iff (a) contrast > 0 in every seed and (b) the mean contrast exceeds both 2 × its sd over the seeds (sample sd) and
1.0 pixel level. The pretrained start is the test of the claim "image DPO steers what the model samples"; the random
start is reported by the same rule as a control. Every number is reported whatever its direction.

**Settings: the preset ``v2`` (the CLI default; session 14, design fixed before the verdict runs).** Session 13 ran
the preset ``first-guess`` (LoRA r 8 on the attention projections, lr 5e-3; not piloted) and failed the rule
(+1.84 ± 1.76 levels, one seed negative). Session 14 piloted on seeds 100 and 101 only (never verdict seeds; table
in docs/image.md): more DPO steps (240), β_d 500 or 10000, lr 2e-2 and an NLL term on the chosen image left the LoRA
runs within ±6 levels (with 240 steps the denoising error rose tenfold and the samples collapsed to grey), while
full fine-tuning (frozen copy of the start as the reference) moved the samples by +77 to +199 levels. ``v2`` =
``first-guess`` with full fine-tuning at lr 3e-5 (lr 1e-4 overshot the training images' range, 28–228; 3e-5 kept
the samples' spread, and the denoising error rose by at most 10 %). Verdict: seeds 0–4 from a freshly
made pretrained start, then the random-start control on seeds 0–4 with the same preset:

    python -m mmalign_experiments.image_brightness_contrast --start pretrained --seeds 0 1 2 3 4 --work-dir outputs/image-brightness-contrast-v2 --out bench/results/image_brightness_contrast_pretrained_v2.json
    python -m mmalign_experiments.image_brightness_contrast --start random --seeds 0 1 2 3 4 --work-dir outputs/image-brightness-contrast-v2 --out bench/results/image_brightness_contrast_random_v2.json

Session 13's runs: the same commands with ``--preset first-guess`` and the files without ``_v2``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

PROMPTS = ("a photo of object 0", "a photo of object 1", "a photo of object 2", "a photo of object 3")
IMAGE_SIZE = 16
HELD_OUT_SEED = 10_000  # sampling seeds HELD_OUT_SEED, HELD_OUT_SEED + 1, ...: never a training seed
MIN_MEAN_CONTRAST = 1.0  # pixel levels: part (b) of the rule


@dataclass
class ContrastSettings:
    """Sizes of one bright-vs-dark contrast; the defaults are the preset ``v2`` (module docstring)."""

    pretrain_images: int = 512
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 2e-3
    pretrain_seed: int = 0
    pairs: int = 64
    dpo_steps: int = 60
    batch_size: int = 8
    learning_rate: float = 3e-5
    beta_d: float = 2000.0
    lora_rank: int = 8
    finetuning: str = "full"  # "lora" (adapter-disabled reference) or "full" (a frozen copy as the reference)
    nll: float = 0.0  # weight of the objective's NLL term: + nll * (denoising error on the chosen image)
    samples: int = 32
    sampling_steps: int = 20
    online_rounds: int = 2  # --method online only
    online_k: int = 8
    online_steps: int = 30


PRESETS = {
    "v2": ContrastSettings(),  # session 14: piloted on seeds 100-101, fixed before the verdict runs
    "first-guess": ContrastSettings(finetuning="lora", learning_rate=5e-3),  # session 13's (not piloted)
}


def brightness_images(rng: np.random.Generator, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``count`` uint8 images ``[count, size, size, 3]``: a flat level drawn from U(40, 215), a colour tint
    (sd 12 per channel), a linear gradient of random direction (±25 across the image) and pixel noise (sd 8)."""
    levels = rng.uniform(40.0, 215.0, size=(count, 1, 1, 1))
    tint = rng.normal(0.0, 12.0, size=(count, 1, 1, 3))
    ramp = np.linspace(-0.5, 0.5, size)
    angle = rng.uniform(0.0, 2 * np.pi, size=(count, 1, 1, 1))
    gradient = 50.0 * (np.cos(angle) * ramp[None, None, :, None] + np.sin(angle) * ramp[None, :, None, None])
    noise = rng.normal(0.0, 8.0, size=(count, size, size, 3))
    return np.clip(levels + tint + gradient + noise, 0, 255).astype(np.uint8)


def preference_rows(seed: int, pairs: int, prefer: str) -> list[dict]:
    """``pairs`` rows ``{prompt, chosen: [image], rejected: [image]}``; ``prefer``: ``bright`` = the brighter image
    of each pair is chosen, ``dark`` = the same pairs, swapped."""
    if prefer not in ("bright", "dark"):
        raise ValueError(f"prefer: expected 'bright' or 'dark', got {prefer!r}")
    rng = np.random.default_rng(seed)
    first, second = brightness_images(rng, pairs), brightness_images(rng, pairs)
    rows = []
    for index in range(pairs):
        a, b = first[index], second[index]
        if a.mean() == b.mean():
            continue
        bright, dark = (a, b) if a.mean() > b.mean() else (b, a)
        chosen, rejected = (bright, dark) if prefer == "bright" else (dark, bright)
        rows.append({"prompt": PROMPTS[index % len(PROMPTS)], "chosen": [chosen], "rejected": [rejected]})
    return rows


def _settings_match(folder: Path, record: dict) -> bool:
    path = folder / "pretrain.json"
    return path.exists() and json.loads(path.read_text()).get("settings") == record


def make_start(folder: Path, start: str, settings: ContrastSettings) -> Path:
    """The start model's folder: the random tiny pixel UNet, or it pretrained by plain denoising (saved once)."""
    import torch

    from mmalign.image.models import load_diffusion_components
    from mmalign.image.testing import save_tiny_pixel_model

    if start not in ("pretrained", "random"):
        raise ValueError(f"start: expected 'pretrained' or 'random', got {start!r}")
    record = {"start": start, **({k: v for k, v in asdict(settings).items() if k.startswith("pretrain")}
                                  if start == "pretrained" else {})}
    if _settings_match(folder, record):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    save_tiny_pixel_model(folder, image_size=IMAGE_SIZE)
    losses: list[float] = []
    began = time.time()
    if start == "pretrained":
        parts = load_diffusion_components(str(folder))
        unet, scheduler = parts.unet, parts.noise_scheduler
        rng = np.random.default_rng(settings.pretrain_seed)
        images = torch.from_numpy(brightness_images(rng, settings.pretrain_images)).permute(0, 3, 1, 2).float()
        pixels = images / 127.5 - 1.0
        prompt_index = torch.from_numpy(rng.integers(0, len(PROMPTS), settings.pretrain_images))
        conditions = parts.conditioner(list(PROMPTS))
        generator = torch.Generator().manual_seed(settings.pretrain_seed)
        torch.manual_seed(settings.pretrain_seed)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.pretrain_learning_rate)
        unet.train()
        for _ in range(settings.pretrain_steps):
            index = torch.randint(0, len(pixels), (settings.pretrain_batch_size,), generator=generator)
            clean = pixels[index]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=conditions[prompt_index[index]]).sample
            loss = torch.nn.functional.mse_loss(prediction, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        unet.save_pretrained(folder / "unet")
    tail = losses[-50:]
    (folder / "pretrain.json").write_text(json.dumps({
        "settings": record, "seconds": round(time.time() - began, 1),
        "loss_first_50": statistics.mean(losses[:50]) if losses else None,
        "loss_last_50": statistics.mean(tail) if tail else None}, indent=2))
    return folder


def sample_brightness(unet, conditioner, scheduler_config, settings: ContrastSettings) -> dict:
    """Mean, sd (over images) and per-image mean pixel level of ``settings.samples`` held-out samples."""
    from mmalign.image.generation import generate_images

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings.samples)]
    images = generate_images(unet, conditioner, scheduler_config, prompts,
                             seeds=[HELD_OUT_SEED + i for i in range(settings.samples)], scheduler="ddim",
                             num_inference_steps=settings.sampling_steps, guidance_scale=1.0,
                             height=IMAGE_SIZE, width=IMAGE_SIZE, batch_size=settings.samples)
    levels = [float(np.asarray(image, dtype=np.float64).mean()) for image in images]
    return {"mean": statistics.mean(levels), "sd": statistics.stdev(levels) if len(levels) > 1 else 0.0,
            "per_image": [round(level, 2) for level in levels]}


def start_brightness(folder: Path, settings: ContrastSettings) -> dict:
    """The start model's own held-out samples (before any DPO): their brightness mean and spread."""
    from mmalign.image.models import load_diffusion_components

    parts = load_diffusion_components(str(folder))
    return sample_brightness(parts.unet, parts.conditioner, parts.noise_scheduler.config, settings)


def _lora_section(settings: ContrastSettings) -> dict:
    if settings.finetuning not in ("lora", "full"):
        raise ValueError(f"finetuning: expected 'lora' or 'full', got {settings.finetuning!r}")
    if settings.finetuning == "full":
        return {"enabled": False}
    return {"r": settings.lora_rank, "alpha": settings.lora_rank}


def _run_config(start_folder: Path, output_dir: Path, seed: int, settings: ContrastSettings, objective: str,
                steps: int) -> dict:
    if output_dir.exists():
        shutil.rmtree(output_dir)
    return {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(start_folder)},
        "lora": _lora_section(settings),
        "data": {"resolution": IMAGE_SIZE},
        "objective": {"name": objective, "beta_d": settings.beta_d, **({"nll": settings.nll} if settings.nll else {})},
        "training": {"batch_size": settings.batch_size, "max_steps": steps,
                     "learning_rate": settings.learning_rate, "lr_scheduler": "constant",
                     "logging_steps": max(1, steps // 4), "progress_bar": False, "seed": seed,
                     "num_threads": 1, "plot": False},
    }


def dpo_run(start_folder: Path, rows: list[dict], output_dir: Path, seed: int, settings: ContrastSettings) -> dict:
    """One offline DPO run through ``mmalign.image.train``; returns the held-out brightness and the last metrics."""
    import mmalign.image

    config = _run_config(start_folder, output_dir, seed, settings, "dpo", settings.dpo_steps)
    result = mmalign.image.train(config, train_dataset=rows)
    model = result.details["preference_model"]
    brightness = sample_brightness(model.unet, model.conditioner, model.noise_scheduler.config, settings)
    keep = ("loss", "implicit_acc", "model_mse", "ref_mse", "rewards/margins")
    return {"brightness": brightness, "last_metrics": {k: result.metrics[k] for k in keep if k in result.metrics}}


def online_run(start_folder: Path, prefer: str, output_dir: Path, seed: int, settings: ContrastSettings) -> dict:
    """Online rounds (``mmalign.image.online``: generate k images per prompt, mDPO on the top vs bottom half by the
    reward ±brightness) from ``start_folder``; the held-out brightness is measured after every round."""
    import mmalign.image

    sign = 1.0 if prefer == "bright" else -1.0

    def reward(prompts, images):
        return [sign * float(np.asarray(image, dtype=np.float64).mean()) for image in images]

    def evaluate(model) -> dict:
        return {"brightness": sample_brightness(model.unet, model.conditioner, model.noise_scheduler.config,
                                                settings)["mean"]}

    config = {**_run_config(start_folder, output_dir, seed, settings, "mdpo", settings.online_steps),
              "prompts": list(PROMPTS), "rounds": settings.online_rounds, "k": settings.online_k,
              "num_inference_steps": settings.sampling_steps, "guidance_scale": 1.0, "resolution": IMAGE_SIZE,
              "seed": seed}
    del config["data"]
    config["training"]["batch_size"] = min(settings.batch_size, len(PROMPTS))  # one group per prompt per round
    result = mmalign.image.online(config, reward=reward, evaluate=evaluate)
    per_round = [row["brightness"] for row in result["rounds"]]
    keep = ("loss", "implicit_acc", "rewards/margins")
    return {"brightness": {"mean": per_round[-1], "per_round": per_round},
            "last_metrics": {k: result.log[-1][k] for k in keep if result.log and k in result.log[-1]}}


def contrast_for_seed(start_folder: Path, seed: int, settings: ContrastSettings, work_dir: Path,
                      method: str = "offline") -> dict:
    """The bright and the dark run of one seed from ``start_folder``; ``contrast`` = bright − dark brightness.
    ``method``: ``offline`` (DPO on the generated pairs) or ``online`` (rounds on the model's own samples)."""
    began = time.time()
    if method == "offline":
        runs = {prefer: dpo_run(start_folder, preference_rows(seed, settings.pairs, prefer),
                                work_dir / f"seed-{seed}-{prefer}", seed, settings) for prefer in ("bright", "dark")}
    elif method == "online":
        runs = {prefer: online_run(start_folder, prefer, work_dir / f"online-seed-{seed}-{prefer}", seed, settings)
                for prefer in ("bright", "dark")}
    else:
        raise ValueError(f"method: expected 'offline' or 'online', got {method!r}")
    bright, dark = runs["bright"]["brightness"]["mean"], runs["dark"]["brightness"]["mean"]
    return {"seed": seed, "contrast": bright - dark, "bright": bright, "dark": dark, "runs": runs,
            "seconds": round(time.time() - began, 1)}


def apply_rule(contrasts: list[float]) -> dict:
    """The module docstring's rule: every contrast > 0, and mean > max(2 × sd, MIN_MEAN_CONTRAST)."""
    mean = statistics.mean(contrasts)
    sd = statistics.stdev(contrasts) if len(contrasts) > 1 else float("nan")
    threshold = max(2 * sd, MIN_MEAN_CONTRAST) if len(contrasts) > 1 else float("nan")
    all_positive = all(c > 0 for c in contrasts)
    return {"contrasts": [round(c, 3) for c in contrasts], "mean": mean, "sd": sd, "threshold": threshold,
            "all_positive": all_positive, "passed": bool(all_positive and mean > threshold)}


def run_experiment(start: str, seeds: list[int], settings: ContrastSettings, work_dir: Path,
                   method: str = "offline", log=print) -> dict:
    """Makes (or reuses) the start, samples it once, runs every seed, applies the rule."""
    import torch

    torch.set_num_threads(1)
    began = time.time()
    folder = make_start(work_dir / f"start-{start}", start, settings)
    before = start_brightness(folder, settings)
    log(f"start {start}: held-out brightness {before['mean']:.2f} (sd over images {before['sd']:.2f})")
    per_seed = []
    for seed in seeds:
        row = contrast_for_seed(folder, seed, settings, work_dir / f"runs-{start}", method)
        log(f"seed {seed}: bright {row['bright']:.2f}  dark {row['dark']:.2f}  contrast {row['contrast']:+.2f} "
            f"({row['seconds']} s)")
        per_seed.append(row)
    rule = apply_rule([row["contrast"] for row in per_seed])
    log(f"{start} {method}: contrast mean {rule['mean']:+.2f}, sd {rule['sd']:.2f}, threshold {rule['threshold']:.2f}, "
        f"all > 0: {rule['all_positive']} -> {'PASSED' if rule['passed'] else 'FAILED'}")
    pretrain = json.loads((folder / "pretrain.json").read_text())
    return {"start": start, "method": method, "seeds": seeds, "settings": asdict(settings), "pretrain": pretrain,
            "start_brightness": before, "per_seed": per_seed, "rule": rule,
            "seconds": round(time.time() - began, 1)}


def settings_from_args(args: argparse.Namespace) -> ContrastSettings:
    """The preset named by ``args.preset`` with every flag that was given (not None) overriding it."""
    given = {name: getattr(args, name) for name in asdict(ContrastSettings()) if getattr(args, name) is not None}
    return replace(PRESETS[args.preset], **given)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", choices=("pretrained", "random"), default="pretrained")
    parser.add_argument("--method", choices=("offline", "online"), default="offline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="bench/results/image_brightness_contrast.json")
    parser.add_argument("--work-dir", default="outputs/image-brightness-contrast",
                        help="start models and run folders (a matching pretrained start there is reused)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="v2", help="settings; the flags below override")
    for name, value in asdict(ContrastSettings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                            help=f"v2: {value}")
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    out = Path(args.out)
    work_dir = Path(args.work_dir)
    result = {"preset": args.preset, **run_experiment(args.start, args.seeds, settings, work_dir, args.method)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
