"""torch.profiler over a few mmalign DPO steps on the benchmark's tiny GPT-2 (not a test): the top operators by
self CPU time, and the fast-path report of the run. Compare environments by running it with each venv's python.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/profile_text_step.py --lora --steps 5 --warmup 3
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/profile_text_step.py --model smollm2 --lora --steps 1 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_text_dpo import LR, lora_targets, model_path, synthetic_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from mmalign.text.train import train

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    steps = {"n": 0}

    def hook(optimizer, *_):
        steps["n"] += 1
        if steps["n"] == args.warmup:
            profiler.start()
        elif steps["n"] == args.warmup + args.steps:
            profiler.stop()

    handle = register_optimizer_step_post_hook(hook)
    with tempfile.TemporaryDirectory(prefix="profile-text-") as tmp:
        work = Path(tmp)
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(8)))
        summary = train({
            "model": {"name_or_path": model_path(args.model, work)},
            "data": {"train": str(data), "format": "pairs"},
            "objective": {"name": "dpo", "beta": 0.1},
            "lora": {"enabled": args.lora, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": lora_targets(args.model)},
            "reference": {"mode": "adapter" if args.lora else "model"},
            "training": {"batch_size": 8, "learning_rate": LR, "lr_scheduler": "constant", "num_threads": args.threads,
                         "max_steps": args.warmup + args.steps + 1, "progress_bar": False, "logging_steps": 10_000,
                         "save_total_limit": None, "max_grad_norm": 1.0, "seed": 0, "plot": False},
            "output_dir": str(work / "out"),
        })
    handle.remove()
    print("fast paths:", json.dumps(summary["fast_paths"]))
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(f"top operators over {args.steps} steps ({args.model}, {'LoRA' if args.lora else 'full'}):\n{table}")


if __name__ == "__main__":
    main()
