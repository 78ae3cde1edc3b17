"""Issue #18: why the FLUX recipe's tiny-layout test stops at step 1 with a non-finite gradient norm on CUDA.

One short device check (flux-nan-notes.md has what was ruled out on CPU and why SDPA's backward is the suspect):

1. the attention of the tiny FLUX transformer as the test runs it (q/k/v ``[4, 2, 576, 16]`` bf16, [B, S, H, D]
   memory permuted to [B, H, S, D], no mask, logsumexp about +4), forward and backward on every SDPA backend,
   with the backend torch picks by default; the same for the tiny SD3 call (``[8, 4, 336, 8]``, contiguous), which
   passes on the H200;
2. the failing test itself, default and with cuDNN SDPA off (``--no-cudnn-sdp``), each in its own process.

    python bench/gpu/flux_nan_probe.py            # on the GPU machine, from the repository root: about 1 min
    python bench/gpu/flux_nan_probe.py --kernels  # part 1 only (also runs on CPU, the CPU backends)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

TEST = ("tests/image/test_family_recipes.py::"
        "test_recipe_runs_end_to_end_on_a_tiny_pipeline_of_its_layout[flux-dpo-lora.yaml]")
# (name, [B, H, S, D], memory order) of the two backbones' SDPA calls in the recipe tests (measured on CPU)
CALLS = (("flux", (4, 2, 576, 16), "bshd"), ("sd3", (8, 4, 336, 8), "bhsd"))


def _qkv(shape, order, device, seed=0):
    import torch

    batch, heads, seq, dim = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors = []
    for _ in range(3):  # RMS-normed q/k as in FLUX (unit scale), bf16
        if order == "bshd":  # the FLUX processor's [B, S, H, D] tensors, permuted by diffusers' dispatch
            t = torch.randn(batch, seq, heads, dim, generator=generator).to(device, torch.bfloat16).permute(0, 2, 1, 3)
        else:
            t = torch.randn(batch, heads, seq, dim, generator=generator).to(device, torch.bfloat16)
        tensors.append(t.detach().requires_grad_(True))
    return tensors


def kernels(device: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "device", torch.cuda.get_device_name() if device == "cuda" else "cpu", flush=True)
    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if device == "cuda" else [SDPBackend.FLASH_ATTENTION]) + [SDPBackend.MATH]
    for name, shape, order in CALLS:
        q, k, v = _qkv(shape, order, device)
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v)).name if device == "cuda" else "(CPU)"
        print(f"{name} {shape} {order}: default backend {choice}", flush=True)
        for backend in [None] + backends:
            for t in (q, k, v):
                t.grad = None
            label = "default" if backend is None else backend.name
            try:
                if backend is None:
                    out = F.scaled_dot_product_attention(q, k, v)
                else:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v)
                out.float().pow(2).mean().backward()
            except RuntimeError as error:
                print(f"  {label:20s} not run: {str(error).splitlines()[0][:100]}", flush=True)
                continue
            bad = [f"{n}:{int((~torch.isfinite(t.grad)).sum())}" for n, t in zip("qkv", (q, k, v))]
            print(f"  {label:20s} out finite {bool(torch.isfinite(out).all())}  non-finite grads {' '.join(bad)}",
                  flush=True)


def run_test(no_cudnn_sdp: bool) -> int:
    """The failing test in a fresh process (cuDNN SDPA off when asked), anomaly detection on: it names the
    backward op that made the first NaN."""
    code = ("import sys, torch, pytest\n"
            + ("torch.backends.cuda.enable_cudnn_sdp(False)\n" if no_cudnn_sdp else "")
            + "torch.autograd.set_detect_anomaly(True)\n"
            + f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', {TEST!r}]))\n")
    print(f"\n===== the recipe test, cuDNN SDPA {'off' if no_cudnn_sdp else 'as default'} =====", flush=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "endoftext" not in line]
    keep = [line for line in lines if any(word in line for word in (
        "passed", "failed", "NonFiniteError", "Backward", "returned nan", "Error detected", "anomaly"))]
    print("\n".join(keep[-12:]) or "\n".join(lines[-12:]), flush=True)
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true", help="only the SDPA calls (part 1)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels(device)
    if args.kernels:
        return 0
    return max(run_test(False), run_test(True))


if __name__ == "__main__":
    sys.exit(main())
