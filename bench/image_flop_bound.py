"""Arithmetic ceiling of the image benchmark's issue goal (#18): FLOPs(twomodel_full step) / FLOPs(mmalign_lora step).

Counts one training step of each loop with ``torch.utils.flop_counter.FlopCounterMode``, using the benchmark's own
step builders (``bench_image_dpo.make_step`` for SD 1.x, ``image_family_bench.make_family_step`` for sdxl / sd3 /
flux), so that exactly the benchmarked code is counted:

- ``twomodel_full``: two backbones, full fine-tuning, four separate forwards (SD 1.x: the bench's ``naive_full``,
  the same loop); ``mmalign_lora``: LoRA, one 2B-image policy forward + one adapter-disabled reference forward.

Every counted op is split by phase (forward, or backward: an autograd node is running), by kind (``attention``:
SDPA kernels; ``linear``: mm / addmm / bmm / baddbmm; ``conv``) and by place (inside the backbone(s) or not: VAE,
text encoders). FlopCounterMode counts matmuls, convolutions and attention only (2 FLOPs per multiply-add);
elementwise work (norms, activations, residual adds, the loss) is NOT counted, nor is the optimiser: AdamW is added
as ``ADAMW_FLOPS_PER_PARAM`` FLOPs per trainable parameter (an elementwise estimate, see below).
The CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which FlopCounterMode does
not know, is counted with its own SDPA formulas.

``--real``: SDXL, SD3-medium, SD3.5-large, FLUX.1-dev at 1024 px (one pair; the published configs' values) with
every tensor a FakeTensor (``FakeTensorMode``: shapes only, no memory, no weights): twomodel_full and, standing in
for mmalign_lora (whose batch-mask selection needs values), the bench's concatenated LoRA loop (flow_lora /
diffusers_lora; within 0.4 % of mmalign_lora's count on every tiny layout). The real backbone and VAE run the whole
step; the text encoders are off it as with ``--cache-text`` (zero embeddings of the real shapes).

    cd <repo> && PYTHONPATH=$PWD:$PWD/bench OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/image_flop_bound.py
    (add --real for the real sizes, --layouts sd3 --shapes proportioned for one case, --md FILE to append a table)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, flop_registry  # noqa: E402

import image_memory_estimate  # noqa: E402

# AdamW per parameter element: m = b1 m + (1-b1) g (3), v = b2 v + (1-b2) g² (4), sqrt(v)/sqrt(bc2) + eps (3),
# p -= lr/bc1 · m / denom (3), decoupled weight decay p *= 1 - lr·wd (1): 14 FLOPs (the bias corrections are scalars).
ADAMW_FLOPS_PER_PARAM = 14
aten = torch.ops.aten
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward,
             aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_efficient_attention_backward,
             aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward,
             aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_cudnn_attention_backward,
             aten._flash_attention_forward, aten._flash_attention_backward, aten._efficient_attention_forward,
             aten._efficient_attention_backward}
CONV = {aten.convolution, aten._convolution, aten.convolution_backward, aten._slow_conv2d_forward,
        aten.cudnn_convolution, aten.convolution_overrideable}
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                flop_registry[aten._scaled_dot_product_flash_attention_backward]}  # the same argument order
# layout -> (two-backbone full loop, mmalign's LoRA step, the bench's hand-written concatenated LoRA loop)
VARIANTS = {"sd": ("naive_full", "mmalign_lora", "diffusers_lora"),
            "sdxl": ("twomodel_full", "mmalign_lora", "diffusers_lora"),
            "sd3": ("twomodel_full", "mmalign_lora", "flow_lora"), "flux": ("twomodel_full", "mmalign_lora", "flow_lora")}


class SplitFlopCounter(FlopCounterMode):
    """FlopCounterMode that also keys every count by (phase, kind, place)."""

    def __init__(self, backbones):
        super().__init__(display=False)
        self.flop_registry.update(CPU_SDPA)  # already shape-wrapped (custom_mapping would wrap them again)
        self.backbones = [b for b in backbones if b is not None]
        self.split: dict[tuple[str, str, str], int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
            kind = "attention" if func_packet in ATTENTION else "conv" if func_packet in CONV else "linear"
            names = {self.mod_tracker._known_modules.get(b) for b in self.backbones} - {None}
            place = "backbone" if names & set(self.mod_tracker.parents) else "other"
            self.split[(phase, kind, place)] += flops
            self.flop_counts["Global"][func_packet] += flops
        return out


def _backbones(step):
    if hasattr(step, "model"):  # mmalign: DiffusionPreferenceModel / FamilyPreferenceModel
        return [step.model.unet, step.model.reference_unet]
    return [getattr(step, "backbone", None) or step.unet, step.reference]


def count_step(step, batch) -> dict:
    """FLOPs of one call of ``step`` (split) and its AdamW estimate."""
    with SplitFlopCounter(_backbones(step)) as counter:
        step(batch)
    trainable = sum(p.numel() for group in step.optimizer.param_groups for p in group["params"])
    split = dict(counter.split)
    return {"split": {"/".join(k): v for k, v in sorted(split.items())}, "counted": sum(split.values()),
            "trainable_params": trainable, "adamw": ADAMW_FLOPS_PER_PARAM * trainable,
            "total": sum(split.values()) + ADAMW_FLOPS_PER_PARAM * trainable}


def count_layout(layout: str, shape: str = "tiny", pairs: int = 4, cache_text: bool = True) -> dict:
    """Both loops of one bench layout, on the bench's own tiny / proportioned pipelines (real tensors)."""
    torch.manual_seed(0)
    if layout == "sd":
        import bench_image_dpo as bench

        parts = bench.build_components()
        steps = {name: bench.make_step(name, parts) for name in VARIANTS[layout]}
        batch = bench.make_batch(pairs, 1)
    else:
        import image_family_bench as family

        parts = family.build_parts(layout, cache_text=cache_text, shape=shape)
        steps = {name: family.make_family_step(name, parts) for name in VARIANTS[layout]}
        batch = family.make_batch(pairs)
    return {name: count_step(step, batch) for name, step in steps.items()}


# ------------------------------------------------------------------------------------------------ real sizes
SDXL_UNET = image_memory_estimate.SDXL_UNET  # the real SDXL UNet's config, written once
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# name -> (bench layout, backbone class, config, text tokens, text width, pooled width, VAE latent channels, VAE factors)
REAL = {
    "sdxl": ("sdxl", "UNet2DConditionModel", SDXL_UNET, 77, 2048, 1280, 4, dict(scaling_factor=0.13025)),
    "sd3-medium": ("sd3", "SD3Transformer2DModel", SD3_MEDIUM, 333, 4096, 2048, 16,
                   dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)),
    "sd3.5-large": ("sd3", "SD3Transformer2DModel", SD35_LARGE, 333, 4096, 2048, 16,
                    dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)),
    "flux.1-dev": ("flux", "FluxTransformer2DModel", FLUX_DEV, 512, 4096, 768, 16,
                   dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)),
}


def count_real(name: str, pixels: int = 1024, pairs: int = 1) -> dict:
    """Both loops at a real model's size, every tensor fake (see the module docstring)."""
    import tempfile

    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmalign.image.families.tiny import build_tiny_pipeline

    layout = REAL[name][0]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # tiny text encoders and tokenizers: off the step
        tiny = build_tiny_pipeline(layout, tokenizer_dir, seed=0)
    components = dict(tiny.components)
    # peft moves new adapters with Module.to(), which swaps FakeTensor parameters and fails (weakrefs); every module
    # here is on the (fake) CPU in float32 already, so Module.to is the identity while the step is counted.
    # The cyclic garbage collector crashes the process (segfault / glibc "corrupted double-linked list") when it
    # collects the fake FLUX model's leftovers: it stays off from here, and main() ends with os._exit.
    import gc

    to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    gc.disable()
    try:
        results = _count_real_fake(name, pixels, pairs, components, type(tiny),
                                   FakeTensorMode(allow_non_fake_inputs=True))
    finally:
        torch.nn.Module.to = to
    return results


def _count_real_fake(name: str, pixels: int, pairs: int, components: dict, pipeline_class, fake) -> dict:
    """The weights and the batch are made in ``fake``; the steps are built outside it (schedulers read their tables'
    values; fake tensors keep their mode outside it) and counted in it."""
    import diffusers

    import image_family_bench as family
    layout, class_name, config, tokens, width, pooled, channels, vae_factors = REAL[name]
    with fake:
        components["unet" if layout == "sdxl" else "transformer"] = getattr(diffusers, class_name)(**config)
        components["vae"] = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), latent_channels=channels, sample_size=pixels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, **vae_factors)
        batch = {"prompts": family.PROMPTS[:pairs], "chosen": torch.rand(pairs, 1, 3, pixels, pixels) * 2 - 1,
                 "rejected": torch.rand(pairs, 1, 3, pixels, pixels) * 2 - 1}
    pipe = pipeline_class(**components)
    pipe.vae.requires_grad_(False).eval()
    parts = {"pipe": pipe, "layout": layout, "cache_text": False, "max_sequence_length": None}
    table = {p: {"states": torch.zeros(tokens, width), "pooled": torch.zeros(pooled)} for p in batch["prompts"]}
    results = {}
    for variant in (VARIANTS[layout][0], VARIANTS[layout][2]):
        step = family.make_family_step(variant, parts)
        step.text_cache = table  # as the bench's --cache-text leaves it
        with fake:
            results[variant] = count_step(step, batch)
        del step
    return results


# ------------------------------------------------------------------------------------------------ report
def summary(counts: dict, full: str, lora: str, baseline_lora: str) -> dict:
    """Ceiling = full / LoRA step FLOPs; the LoRA step is mmalign's, or the concatenated LoRA loop where mmalign's
    was not counted (real sizes); ``lora_loop_vs_mmalign``: its counted FLOPs over mmalign's (where both are)."""
    check = (counts[baseline_lora]["counted"] / counts[lora]["counted"]) if lora in counts else None
    lora = lora if lora in counts else baseline_lora
    def attention(c):
        return sum(v for k, v in c["split"].items() if "/attention/" in k) / c["counted"]

    def backbone(c):
        return sum(v for k, v in c["split"].items() if k.endswith("/backbone")) / c["counted"]

    return {"full": counts[full]["total"], "lora": counts[lora]["total"],
            "ceiling": counts[full]["total"] / counts[lora]["total"],
            "ceiling_counted_only": counts[full]["counted"] / counts[lora]["counted"],
            "attention_share": (attention(counts[full]), attention(counts[lora])),
            "backbone_share": (backbone(counts[full]), backbone(counts[lora])),
            "adamw_share": (counts[full]["adamw"] / counts[full]["total"], counts[lora]["adamw"] / counts[lora]["total"]),
            "lora_step": lora, "lora_loop_vs_mmalign": check}


def _t(flops: float) -> str:
    return f"{flops / 1e12:.2f} T" if flops >= 1e11 else f"{flops / 1e9:.3f} G"


def table_rows(rows) -> str:
    lines = ["| layout | shape | FLOPs twomodel_full / mmalign_lora | ceiling ratio (with AdamW) | without AdamW "
             "| attention share (full / LoRA) | backbone share (full / LoRA) | LoRA step counted |",
             "|---|---|---|---|---|---|---|---|"]
    for layout, shape, s in rows:
        lines.append(f"| {layout} | {shape} | {_t(s['full'])} / {_t(s['lora'])} | **{s['ceiling']:.3f}** "
                     f"| {s['ceiling_counted_only']:.3f} | {s['attention_share'][0]:.1%} / {s['attention_share'][1]:.1%} "
                     f"| {s['backbone_share'][0]:.1%} / {s['backbone_share'][1]:.1%} | {s['lora_step']}"
                     + (f" ({s['lora_loop_vs_mmalign']:.3f}× in the LoRA loop)" if s["lora_loop_vs_mmalign"] else "") + " |")
    return "\n".join(lines)


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="sd,sdxl,sd3,flux")
    parser.add_argument("--shapes", default="tiny,proportioned", help="proportioned: sd3 / flux only")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--text-per-step", action="store_true",
                        help="sdxl/sd3/flux: encode the prompts in the step (default: the bench's --cache-text)")
    parser.add_argument("--real", default="", help="comma list of " + ", ".join(REAL) + " (or 'all')")
    parser.add_argument("--json", default=None, help="write every count here")
    parser.add_argument("--md", default=None, help="append the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, raw = [], {}
    for layout in filter(None, args.layouts.split(",")):
        for shape in args.shapes.split(","):
            if shape == "proportioned" and layout not in ("sd3", "flux") or layout == "sd" and shape != "tiny":
                continue
            counts = count_layout(layout, shape, args.pairs, cache_text=not args.text_per_step)
            raw[f"{layout}/{shape}"] = counts
            rows.append((layout if layout != "sd" else "sd (1.5)", shape, summary(counts, *VARIANTS[layout])))
            print(table_rows(rows[-1:]).splitlines()[-1], flush=True)
    for name in (REAL if args.real == "all" else filter(None, args.real.split(","))):
        counts = count_real(name)
        raw[f"{name}/1024px"] = counts
        rows.append((name, "real, 1024 px", summary(counts, *VARIANTS[REAL[name][0]])))
        print(table_rows(rows[-1:]).splitlines()[-1], flush=True)
    text = table_rows(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(raw, handle, indent=1)
    if args.md:
        with open(args.md, "a") as handle:
            handle.write(text + "\n")
    if raw and any(key.endswith("/1024px") for key in raw):  # no collection at exit (see count_real)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
