"""One objective spec, two modalities, one Python program: mDPO on preference *groups* aligns a causal LM and a
text-to-image diffusion model through ``mmalign.train``, which picks the backend from the objects it is given.

    python examples/mixed_modalities.py [--output-dir runs/mixed] [--steps 6]

Offline and small on purpose (about a minute on 2 CPUs): a tiny causal LM and a tiny Stable-Diffusion-layout
pipeline built from configs (``mmalign.testing``, ``mmalign.image.testing``), text groups of polite (chosen) vs
rude (rejected) answers and image groups of bright (chosen) vs dark (rejected) textures. Swap in real objects
(``AutoModelForCausalLM.from_pretrained(...)``, ``StableDiffusionPipeline.from_pretrained(...)``, a
``datasets.Dataset``) and the calls stay the same.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmalign
from mmalign.image.testing import build_tiny_sd_pipeline
from mmalign.testing import build_tiny_causal_lm, build_tiny_tokenizer, tiny_preference_rows

# The one objective spec both jobs use: mDPO (SPEC §3) on groups, β on each modality's log-ratio.
OBJECTIVE = {"name": "mdpo", "beta": 1.0}


def image_groups(n: int, size: int = 32, k: int = 2) -> list[dict]:
    """Groups of ``k`` bright (chosen) and ``k`` dark (rejected) images: PIL images and uint8 arrays both work."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        bright = [Image.fromarray((170 + rng.integers(0, 80, (size, size, 3))).astype(np.uint8)) for _ in range(k)]
        dark = [rng.integers(0, 80, (size, size, 3)).astype(np.uint8) for _ in range(k)]
        rows.append({"prompt": f"a photo of object {i % 4}", "chosen": bright, "rejected": dark})
    return rows


def shared_sections(steps: int) -> dict:
    """The sections both configs share, spelled the same for text and image."""
    return {
        "objective": OBJECTIVE,
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "training": {"batch_size": 2, "max_steps": steps, "learning_rate": 2e-3, "lr_scheduler": "constant",
                     "logging_steps": 1, "progress_bar": False, "plot": False, "num_threads": 1, "seed": 0},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python examples/mixed_modalities.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mixed"))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # -- text: a causal LM object, a tokenizer object, groups as a list of dicts -------------------------------
    tokenizer = build_tiny_tokenizer()
    language_model = build_tiny_causal_lm(vocab_size=len(tokenizer))
    text = mmalign.train(
        {**shared_sections(args.steps), "output_dir": str(args.output_dir / "text"),
         "training": {**shared_sections(args.steps)["training"], "max_prompt_length": 32, "max_response_length": 24}},
        model=language_model, tokenizer=tokenizer, train_dataset=tiny_preference_rows(8, kind="groups", seed=1),
    )

    # -- image: a diffusers pipeline object, groups of PIL images / arrays -----------------------------------------
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipeline = build_tiny_sd_pipeline(tokenizer_dir, image_size=32)
        image = mmalign.train(
            {**shared_sections(args.steps), "data": {"resolution": 32}, "output_dir": str(args.output_dir / "image")},
            pipeline=pipeline, train_dataset=image_groups(8),
        )

    results = {"text": text, "image": image}
    for name, result in results.items():
        margins = [row["rewards/margins"] for row in result.log if "rewards/margins" in row]
        print(f"{name:5s}: {type(result.model).__name__}, {result.global_step} steps, loss {result.metrics['loss']:.4f}, "
              f"rewards/margins {margins[0]:+.4f} -> {margins[-1]:+.4f}; saved to {result.final_dir}")
    return results


if __name__ == "__main__":
    main()
