"""Where two image-step variants differ: one warm step of each under ``torch.profiler`` (self CPU time and call
count per op), printed side by side, largest difference first. For finding what a loop does that its peer does not
(op counts are exact; times are only as quiet as the box).

    PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/profile_image_step.py --layout sd3 --backbone-scale 4 --cache-text flow_lora mmalign_lora
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def profile_step(step, batch, steps: int = 1) -> tuple[dict[str, tuple[int, float]], float]:
    """``({op: (calls, self CPU ms)}, wall ms per step)`` over ``steps`` warm steps."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        wall = (time.perf_counter() - start) * 1000 / steps
    ops = {event.key: (event.count // steps, event.self_cpu_time_total / 1000 / steps)
           for event in profiler.key_averages()}
    return ops, wall


def main() -> None:
    import image_family_bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("sdxl", "sd3", "flux"), default="sd3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=30)
    image_family_bench.add_arguments(parser)
    parser.add_argument("variants", nargs=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = image_family_bench.build_parts(args.layout, backbone_scale=args.backbone_scale,
                                           cache_text=args.cache_text, shape=args.shape)
    batch = image_family_bench.make_batch(args.pairs)
    (a, b) = args.variants
    results = {}
    for name in (a, b):
        results[name] = profile_step(image_family_bench.make_family_step(name, parts), batch, args.steps)
    (ops_a, wall_a), (ops_b, wall_b) = results[a], results[b]
    total_a, total_b = sum(t for _, t in ops_a.values()), sum(t for _, t in ops_b.values())
    print(f"{args.shape} {args.layout} x{args.backbone_scale}, load {os.getloadavg()}: wall ms/step {a} {wall_a:.0f}, "
          f"{b} {wall_b:.0f}; profiled self CPU ms {total_a:.0f} / {total_b:.0f}; op calls "
          f"{sum(c for c, _ in ops_a.values())} / {sum(c for c, _ in ops_b.values())}")
    print(f"| op | calls {a} | calls {b} | ms {a} | ms {b} | ms {b} − {a} |\n|---|---|---|---|---|---|")
    keys = sorted(set(ops_a) | set(ops_b),
                  key=lambda k: -abs(ops_b.get(k, (0, 0.0))[1] - ops_a.get(k, (0, 0.0))[1]))
    for key in keys[: args.top]:
        (ca, ta), (cb, tb) = ops_a.get(key, (0, 0.0)), ops_b.get(key, (0, 0.0))
        print(f"| {key} | {ca} | {cb} | {ta:.1f} | {tb:.1f} | {tb - ta:+.1f} |")
    print("calls that differ:", {k: (ops_a.get(k, (0, 0))[0], ops_b.get(k, (0, 0))[0]) for k in sorted(set(ops_a) | set(ops_b))
                                 if ops_a.get(k, (0, 0))[0] != ops_b.get(k, (0, 0))[0]})


if __name__ == "__main__":
    main()
