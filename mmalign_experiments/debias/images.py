"""Sampling images from a diffusion model for the debiasing run, with an on-disk PNG cache.

The cache key covers everything that decides an image: the model (its path and the size and time of its UNet
files, or the hub name and revision), the sampler settings, the resolution, the prompt and the seed. Every image
has its own seed (``mmalign.image.generation``), so cached and fresh images are identical whatever the batching.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mmalign_experiments.debias.config import SamplingConfig
from mmalign.io import atomic_write_bytes

__all__ = ["ImageSampler", "ImageCache", "model_fingerprint", "default_cache_dir"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMALIGN_CACHE", Path.home() / ".cache" / "mmalign")) / "debias"


def model_fingerprint(pretrained: str, revision: Optional[str] = None, variant: Optional[str] = None,
                      text_conditioner: Optional[str] = None) -> dict:
    """What identifies the weights: for a local folder its UNet's (or transformer's) file sizes and times."""
    path = Path(pretrained)
    entry: dict = {"pretrained": pretrained, "revision": revision, "variant": variant,
                   "text_conditioner": text_conditioner}
    if path.is_dir():
        entry["pretrained"] = str(path.resolve())
        unet_dir = path / "unet" if (path / "unet").is_dir() else path / "transformer"  # SD3 / FLUX: transformer
        entry["files"] = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                                for f in unet_dir.rglob("*") if f.is_file()) if unet_dir.is_dir() else []
    return entry


class ImageSampler:
    """``sampler(prompts, seeds) -> uint8 [N, H, W, 3]`` from a UNet (+ VAE) and text conditioner."""

    def __init__(self, unet, conditioner, scheduler_config, sampling: SamplingConfig, resolution: int, vae=None):
        self.unet, self.conditioner, self.scheduler_config, self.vae = unet, conditioner, scheduler_config, vae
        self.sampling, self.resolution = sampling, resolution

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: bool = True) -> np.ndarray:
        from mmalign.image.generation import generate_images

        images = generate_images(
            self.unet, self.conditioner, self.scheduler_config, list(prompts), vae=self.vae, seeds=list(seeds),
            scheduler=self.sampling.scheduler, num_inference_steps=self.sampling.num_inference_steps,
            guidance_scale=self.sampling.guidance_scale, height=self.resolution, width=self.resolution,
            batch_size=self.sampling.batch_size, progress=progress,
        )
        return np.stack([np.asarray(image.convert("RGB")) for image in images])


def _slug(prompt: str) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
    return f"{text}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


class ImageCache:
    """PNG files ``<root>/<model key>/<prompt slug>/<seed>.png``; missing ones are sampled in one batched call."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict, sampling: SamplingConfig, resolution: int):
        identity = {"model": fingerprint, "sampling": asdict(sampling), "resolution": resolution}
        identity["sampling"].pop("batch_size")  # batching does not change an image
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) / self.key
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "cache.json"
        if not info.exists():
            atomic_write_bytes(info, (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())

    def file(self, prompt: str, seed: int) -> Path:
        return self.root / _slug(prompt) / f"{int(seed)}.png"

    def fetch(self, sampler: ImageSampler, prompts: Sequence[str], seeds: Sequence[int]) -> list[Path]:
        """Paths of the images for (prompt, seed) pairs, sampling the ones not cached yet."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        files = [self.file(p, s) for p, s in zip(prompts, seeds)]
        missing = [i for i, f in enumerate(files) if not f.exists()]
        if missing:
            images = sampler([prompts[i] for i in missing], [seeds[i] for i in missing])
            for i, image in zip(missing, images):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                atomic_write_bytes(files[i], buffer.getvalue())
        return files


def read_images(files: Sequence[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
