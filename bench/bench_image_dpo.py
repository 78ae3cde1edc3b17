"""Benchmark: mmalign's Diffusion-DPO training step vs diffusers-example-style steps.

All run on the same tiny Stable-Diffusion-layout pipeline built from a config (mmalign.image.testing; UNet ~1.4M
parameters, 64x64 images -> 16x16 latents, CLIP text encoder), same data, same optimiser (AdamW), same loss:

- ``diffusers_full``: the loop of the diffusers ``train_diffusion_dpo.py`` example (chosen ‖ rejected concatenated
  into ONE 2B-image VAE encode, ONE policy UNet forward and ONE no-grad reference forward), with full fine-tuning
  and a separate frozen reference UNet (two UNets in memory).
- ``diffusers_lora``: the same concatenated loop with LoRA on the UNet attention and the reference computed by
  disabling the adapter, as the diffusers example itself does.
- ``naive_full`` / ``naive_lora``: a naive re-implementation that encodes chosen and rejected separately and runs
  four separate UNet forwards (policy chosen, policy rejected, reference chosen, reference rejected). Kept to show
  what the concatenation is worth; it is NOT what the diffusers example does.
- ``mmalign_full``: mmalign's DiffusionPreferenceModel, full fine-tuning + frozen copy.
- ``mmalign_lora``: mmalign's default: LoRA, reference = adapter disabled (one UNet in memory).
- ``mmalign_mdpo_k{K}``: mmalign LoRA with groups of K chosen + K rejected per prompt (mDPO), same prompts.

Headline comparisons are same-mode: mmalign_full vs diffusers_full, mmalign_lora vs diffusers_lora; the memory
saved by LoRA is reported separately (mmalign_lora / mmalign_full).

Timing: variants interleaved round-robin in one process (``--rounds``), median sec/step after warmup, plus the
median of per-round ratios (cancels part of the load drift on a shared machine).
Memory: each variant in a fresh subprocess (median of ``--memory-repeats``), two measures over building the variant
and running ``--memory-steps`` steps, from after the shared pipeline is built (so the reference copy, optimiser state,
gradients and activations all count):

- peak RSS growth (VmHWM, reset): what the process costs the machine. On CPU it also holds one-time costs shared by
  every variant (library code pages first touched by the kernels: reported as "code pages"; oneDNN kernels and
  thread pools) and what glibc's heap keeps after frees, so it compresses the ratios between variants.
- peak tensor memory: the high-water mark of live bytes in torch's CPU allocator (torch.profiler allocation
  events), the CPU analogue of ``torch.cuda.max_memory_allocated``: parameters, copies, optimiser state,
  gradients and activations, with no allocator or runtime overhead.

(Linux /proc; CPU only: the memory subprocesses hide CUDA.) Raw results go to ``--json``
(default bench/results/image_results.json).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_image_dpo.py --threads 2 --rounds 8 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on a shared, oversubscribed box spinning threads dominate the
# timings (must be set before torch is imported; subprocesses inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmalign.io import atomic_write_text  # noqa: E402

BETA_D = 5000.0
VARIANTS_BASE = ("diffusers_full", "diffusers_lora", "naive_full", "naive_lora", "mmalign_full", "mmalign_lora")
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "image_results.json")


def build_components(seed: int = 0, unet_channels=(32, 64)):
    from mmalign.image.conditioning import CLIPTextConditioner
    from mmalign.image.models import configure_attention
    from mmalign.image.testing import build_tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_tiny_sd_pipeline(tokenizer_dir, image_size=64, seed=seed, unet_channels=unet_channels)
    configure_attention(pipe.unet, "auto")
    return {
        "unet": pipe.unet,
        "vae": pipe.vae.requires_grad_(False).eval(),
        "conditioner": CLIPTextConditioner(pipe.tokenizer, pipe.text_encoder),
        "scheduler": pipe.scheduler,
    }


def make_batch(pairs: int, k: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompts": [f"a photo of object {i}" for i in range(pairs)],
        "chosen": torch.rand(pairs, k, 3, 64, 64, generator=generator) * 2 - 1,
        "rejected": torch.rand(pairs, k, 3, 64, 64, generator=generator) * 2 - 1,
    }


class MmalignStep:
    def __init__(self, parts, finetuning: str, objective: str = "dpo"):
        import mmalign
        from mmalign.image.diffusion import DiffusionPreferenceModel
        from mmalign.image.models import add_lora, frozen_copy

        unet = copy.deepcopy(parts["unet"])
        reference = None
        if finetuning == "lora":
            add_lora(unet, rank=8)
        else:
            reference = frozen_copy(unet)
            unet.requires_grad_(True)
        self.model = DiffusionPreferenceModel(unet, parts["scheduler"], parts["conditioner"], parts["vae"], reference)
        self.model.train()
        self.objective = mmalign.objective(objective, beta=BETA_D / 2)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)

    def __call__(self, batch):
        out = self.objective(**self.model(batch).objective_inputs())
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


class _TwoUNetStep:
    """Shared set-up of the hand-written baselines: policy UNet (+ LoRA, or + a separate frozen reference UNet)."""

    def __init__(self, parts, finetuning: str):
        from mmalign.image.models import add_lora

        self.unet = copy.deepcopy(parts["unet"])
        self.lora = finetuning == "lora"
        if self.lora:
            add_lora(self.unet, rank=8)
            self.reference = None
        else:
            self.reference = copy.deepcopy(parts["unet"]).requires_grad_(False).eval()
        self.unet.train()
        self.vae, self.conditioner, self.scheduler = parts["vae"], parts["conditioner"], parts["scheduler"]
        self.optimizer = torch.optim.AdamW([p for p in self.unet.parameters() if p.requires_grad], lr=1e-5)

    def _reference(self, noisy, t, states):
        with torch.no_grad():
            if self.lora:
                self.unet.disable_adapters()
                try:
                    return self.unet(noisy, t, encoder_hidden_states=states).sample
                finally:
                    self.unet.enable_adapters()
            return self.reference(noisy, t, encoder_hidden_states=states).sample

    def _finish(self, model_w, model_l, ref_w, ref_l):
        inside = -0.5 * BETA_D * ((model_w - model_l) - (ref_w - ref_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class DiffusersStep(_TwoUNetStep):
    """As the diffusers train_diffusion_dpo.py example: chosen ‖ rejected in one 2B batch for the VAE, the policy
    and the reference; one t and one ε per pair, repeated for both halves."""

    def __call__(self, batch):
        pixels = torch.cat([batch["chosen"][:, 0], batch["rejected"][:, 0]])
        pairs = batch["chosen"].shape[0]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            states = self.conditioner(batch["prompts"]).repeat(2, 1, 1)
        noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (pairs,)).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, t)
        model = F.mse_loss(self.unet(noisy, t, encoder_hidden_states=states).sample, noise,
                           reduction="none").mean((1, 2, 3))
        ref = F.mse_loss(self._reference(noisy, t, states), noise, reduction="none").mean((1, 2, 3))
        model_w, model_l = model.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        return self._finish(model_w, model_l, ref_w, ref_l)


class NaiveStep(_TwoUNetStep):
    """Naive: chosen and rejected encoded separately and denoised in four separate UNet forwards."""

    def __call__(self, batch):
        chosen, rejected = batch["chosen"][:, 0], batch["rejected"][:, 0]
        scale = self.vae.config.scaling_factor
        with torch.no_grad():
            latents_w = self.vae.encode(chosen).latent_dist.sample() * scale
            latents_l = self.vae.encode(rejected).latent_dist.sample() * scale
            states = self.conditioner(batch["prompts"])
        noise = torch.randn_like(latents_w)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents_w.shape[0],))
        noisy_w = self.scheduler.add_noise(latents_w, noise, t)
        noisy_l = self.scheduler.add_noise(latents_l, noise, t)
        ref_w = F.mse_loss(self._reference(noisy_w, t, states), noise, reduction="none").mean((1, 2, 3))
        ref_l = F.mse_loss(self._reference(noisy_l, t, states), noise, reduction="none").mean((1, 2, 3))
        model_w = F.mse_loss(self.unet(noisy_w, t, encoder_hidden_states=states).sample, noise, reduction="none").mean((1, 2, 3))
        model_l = F.mse_loss(self.unet(noisy_l, t, encoder_hidden_states=states).sample, noise, reduction="none").mean((1, 2, 3))
        return self._finish(model_w, model_l, ref_w, ref_l)


def make_step(name: str, parts):
    if name.startswith("diffusers_"):
        return DiffusersStep(parts, name.split("_")[1])
    if name.startswith("naive_"):
        return NaiveStep(parts, name.split("_")[1])
    if name.startswith("mmalign_mdpo"):
        return MmalignStep(parts, "lora", objective="mdpo")
    return MmalignStep(parts, name.split("_")[1])


def group_size(name: str) -> int:
    return int(name.rsplit("k", 1)[1]) if name.startswith("mmalign_mdpo_k") else 1


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(name: str, pairs: int, steps: int, unet_channels=(32, 64)) -> dict:
    """Runs in a fresh process: peak RSS growth over building the variant and running ``steps`` steps.

    The pipeline and the batch are built first; freed heap is returned to the OS (malloc_trim) and the kernel's
    peak-RSS mark is reset (``5 > /proc/self/clear_refs``), so ``peak_mb`` is the variant's own high-water mark.
    ``code_pages_mb``: growth of file-backed RSS (library code first run by this variant's kernels), part of it.
    """
    import ctypes
    import gc

    torch.manual_seed(0)
    parts = build_components(unet_channels=unet_channels)
    batch = make_batch(pairs, group_size(name))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before, file_before = _status_kib("VmRSS"), _status_kib("RssFile")
    step = make_step(name, parts)
    for _ in range(steps):
        step(batch)
    return {"peak_mb": (_status_kib("VmHWM") - before) / 1024.0,
            "code_pages_mb": (_status_kib("RssFile") - file_before) / 1024.0}


def peak_tensor_memory_mb(name: str, pairs: int, steps: int, unet_channels=(32, 64), family_args=None) -> dict:
    """Runs in a fresh process: high-water mark of live CPU-allocator bytes over building the variant and running
    ``steps`` steps (allocation/free events of ``torch.profiler`` with ``profile_memory``; the profiler's own
    bookkeeping is not allocated through torch's allocator, so it does not count)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    if family_args is None:
        parts, batch, make = build_components(unet_channels=unet_channels), make_batch(pairs, group_size(name)), make_step
    else:  # sdxl / sd3 / flux
        import image_family_bench

        parts, batch, make = image_family_bench.memory_setup(family_args)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step = make(name, parts)
        for _ in range(steps):
            step(batch)
    events = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocation events; cannot measure tensor memory")
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return {"peak_tensor_mb": peak / 2 ** 20}


def time_rounds(steps: dict, batches: dict, variants, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, round-robin (one step of every variant per round), warmup rounds dropped."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name in variants:
            start = time.perf_counter()
            steps[name](batches[name])
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        print(f"round {round_index + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4, help="pairs (prompts) per step")
    parser.add_argument("--k", type=int, default=4, help="group size of the mDPO variant")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="fresh processes per variant and memory measure; the median is reported")
    parser.add_argument("--json", default=DEFAULT_JSON, help="write the raw results here (default: %(default)s)")
    parser.add_argument("--unet-channels", default="32,64",
                        help="UNet block widths (two); wider = more parameter/optimiser memory relative to activations")
    parser.add_argument("--memory-only", action="store_true", help="skip the timing rounds")
    parser.add_argument("--layout", choices=("sd", "sdxl", "sd3", "flux"), default="sd",
                        help="sd: the SD 1.x variants below; sdxl / sd3 / flux: bench/image_family_bench.py's variants")
    import image_family_bench

    image_family_bench.add_arguments(parser)
    parser.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-measure", choices=("rss", "tensor"), default="rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    if args.memory_variant:
        if args.layout != "sd":
            print(json.dumps(peak_tensor_memory_mb(args.memory_variant, args.pairs, args.memory_steps,
                                                   family_args=args)))
            return
        measure = peak_memory_mb if args.memory_measure == "rss" else peak_tensor_memory_mb
        print(json.dumps(measure(args.memory_variant, args.pairs, args.memory_steps, channels)))
        return
    if args.layout != "sd":
        args.default_json = DEFAULT_JSON
        image_family_bench.family_main(args)
        return

    variants = VARIANTS_BASE + (f"mmalign_mdpo_k{args.k}",)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    parts = build_components(unet_channels=channels)
    steps = {name: make_step(name, parts) for name in variants} if not args.memory_only else {}
    batches = {name: make_batch(args.pairs, group_size(name)) for name in variants}
    times = ({name: [] for name in variants} if args.memory_only
             else time_rounds(steps, batches, variants, args.warmup, args.rounds))
    medians = {name: statistics.median(values) if values else float("nan") for name, values in times.items()}
    for name in variants:
        print(f"{name}: median {medians[name]:.3f} s/step over {len(times[name])} rounds", flush=True)

    # memory_runs[name] = one dict per fresh process: peak_mb, code_pages_mb (RSS) and peak_tensor_mb (profiler)
    memory_runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.memory_repeats):
        for name in variants:
            run = {}
            for measure in ("rss", "tensor"):
                env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
                result = subprocess.run(
                    [sys.executable, __file__, "--memory-variant", name, "--memory-measure", measure, "--threads",
                     str(args.threads), "--pairs", str(args.pairs), "--k", str(args.k), "--memory-steps",
                     str(args.memory_steps), "--unet-channels", args.unet_channels],
                    capture_output=True, text=True, env=env, check=True)
                run.update(json.loads(result.stdout.strip().splitlines()[-1]))
            memory_runs[name].append(run)
        print(f"memory repeat {repeat + 1}/{args.memory_repeats}", file=sys.stderr, flush=True)
    memory = {name: statistics.median(run["peak_mb"] for run in runs) for name, runs in memory_runs.items()}
    code_pages = {name: statistics.median(run["code_pages_mb"] for run in runs) for name, runs in memory_runs.items()}
    tensor_memory = {name: statistics.median(run["peak_tensor_mb"] for run in runs)
                     for name, runs in memory_runs.items()}

    mdpo = f"mmalign_mdpo_k{args.k}"
    # (label, slower/reference variant, variant): time ratios are reference / variant (> 1 = variant faster).
    speed_pairs = (
        ("speed, same mode, full: diffusers_full / mmalign_full", "diffusers_full", "mmalign_full"),
        ("speed, same mode, LoRA: diffusers_lora / mmalign_lora", "diffusers_lora", "mmalign_lora"),
        ("speed, naive_full / diffusers_full (what concatenation is worth)", "naive_full", "diffusers_full"),
        ("speed, naive_lora / diffusers_lora (what concatenation is worth)", "naive_lora", "diffusers_lora"),
        ("speed, mixed mode: diffusers_full / mmalign_lora (LoRA default vs full example)", "diffusers_full", "mmalign_lora"),
        (f"mDPO k={args.k} step / pair step (goal <= {args.k})", mdpo, "mmalign_lora"),
    )
    memory_pairs = (
        ("memory, issue goal <= 0.7: mmalign_lora / naive_full (two UNets, separate forwards)", "mmalign_lora",
         "naive_full"),
        ("memory, issue goal <= 0.7: mmalign_lora / diffusers_full (two UNets, concatenated)", "mmalign_lora",
         "diffusers_full"),
        ("memory, same mode, full: mmalign_full / diffusers_full", "mmalign_full", "diffusers_full"),
        ("memory, same mode, LoRA: mmalign_lora / diffusers_lora", "mmalign_lora", "diffusers_lora"),
        ("memory, LoRA vs full (mmalign): mmalign_lora / mmalign_full", "mmalign_lora", "mmalign_full"),
        ("memory, LoRA vs full (diffusers-style): diffusers_lora / diffusers_full", "diffusers_lora", "diffusers_full"),
    )
    ratios: dict[str, float] = {}
    for label, slow, fast in () if args.memory_only else speed_pairs:
        ratios[label + " (ratio of medians)"] = medians[slow] / medians[fast]
        # same-round ratios cancel part of the load drift of a shared machine
        ratios[label + " (median per-round ratio)"] = statistics.median(
            a / b for a, b in zip(times[slow], times[fast]))
    for label, numerator, denominator in memory_pairs:
        ratios[label + " (peak RSS)"] = memory[numerator] / memory[denominator]
        ratios[label + " (peak tensor memory)"] = tensor_memory[numerator] / tensor_memory[denominator]
    unet_params = sum(p.numel() for p in parts["unet"].parameters())
    print(f"\ntiny SD: UNet {unet_params / 1e6:.2f}M params (block widths {channels}), 64x64 images (16x16 latents), "
          f"{args.pairs} prompts/step, {args.threads} threads, "
          f"{'memory only' if args.memory_only else f'{args.rounds} rounds'}, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average before/after "
          f"{load_before} / {os.getloadavg()}")
    print(f"memory: median of {args.memory_repeats} fresh processes per variant and measure, {args.memory_steps} steps")
    print("| variant | median s/step | min s/step | peak RSS growth (MB) | of which code pages (MB) "
          "| peak tensor memory (MB) |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        fastest = min(times[name]) if times[name] else float("nan")
        print(f"| {name} | {medians[name]:.3f} | {fastest:.3f} | {memory[name]:.1f} | {code_pages[name]:.1f} "
              f"| {tensor_memory[name]:.1f} |")
    for label, value in ratios.items():
        print(f"- {label}: {value:.2f}")
    results = {"medians_s": medians, "times_s": times, "peak_memory_mb": memory, "code_pages_mb": code_pages,
               "peak_tensor_memory_mb": tensor_memory, "memory_runs": memory_runs, "ratios": ratios,
               "unet_params": unet_params, "args": vars(args), "torch": torch.__version__,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_before": load_before,
               "load_average_after": os.getloadavg(), "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")  # never a half-written results file
    print(f"raw results: {args.json}")

if __name__ == "__main__":
    main()
