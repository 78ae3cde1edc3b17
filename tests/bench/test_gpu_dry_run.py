"""The GPU bench's CPU dry run end to end (tiny Llama layout, tiny UNet, float32, a few steps): it must not rot
between the draws of a GPU. About 1-2 minutes on 2 CPUs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_bench_dry_run_writes_every_section_with_finite_numbers(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "run_gpu_bench.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["meta"]["dry_run"] is True
    assert set(data["sections"]) == {"device", "text", "image", "suite"}
    assert data["sections"]["suite"] == {"status": "skipped", "reason": "dry run"}
    for section in ("device", "text", "image"):
        assert data["sections"][section]["outcome"] == "finished", data["sections"][section]
    assert data["errors"] == [], data["errors"]
    # the only skip is xformers (CUDA only): no case ran out of its budget
    assert [s["case"] for s in data["skipped"]] == ["xformers"], data["skipped"]
    assert _finite(data["matmul_tflops"]) and data["matmul_tflops"] > 0

    text = {(r["objective"], r["finetuning"], r["impl"]): r for r in data["text_summary"]}
    expected = {(o, m, i) for o in ("dpo", "mdpo") for m in ("lora", "full") for i in ("mmalign", "trl", "bare")
                if not (o == "mdpo" and i == "trl")}  # TRL has no group objective: recorded as n/a
    assert set(text) == expected
    for row in text.values():
        for key in ("median_step_s", "tokens_per_s", "peak_memory_mib", "mfu", "speed_vs_bare"):
            assert _finite(row[key]) and row[key] > 0, (row, key)
    assert all(_finite(text[("dpo", m, "mmalign")]["speed_vs_trl"]) for m in ("lora", "full"))
    na = [e for e in data["entries"] if e.get("status") == "n/a"]
    assert {(e["objective"], e["impl"]) for e in na} == {("mdpo", "trl")}

    image = {(r["variant"], r["gradient_checkpointing"]): r for r in data["image_summary"]}
    variants = {"mmalign_lora", "mmalign_mdpo_k4", "mmalign_full", "naive_full", "naive_lora", "diffusers_lora",
                "diffusers_full"}
    assert set(image) == {(v, gc) for v in variants for gc in (False, True)}
    assert {r["attention"] for r in data["image_summary"]} == {"sdpa"}
    for row in image.values():
        for key in ("median_step_s", "images_per_s", "peak_memory_mib"):
            assert _finite(row[key]) and row[key] > 0, (row, key)
    assert all(_finite(g["value"]) for g in data["goals"]), data["goals"]
    # the short table comes last on stdout
    assert "GOAL" in proc.stdout.splitlines()[-2] and proc.stdout.splitlines()[-1].startswith("errors: 0")


@pytest.mark.slow
def test_gpu_bench_focused_text_plan_runs_every_variant(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "run_gpu_bench.py"), "--dry-run",
                           "--sections", "text", "--text-plan", "focused", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["meta"]["text_plan"] == "focused" and data["errors"] == [], data["errors"]
    ran = {(e["objective"], e["finetuning"], e["impl"]): e for e in data["entries"] if e.get("status") == "ok"}
    assert {i for (_, _, i) in ran} == {"mmalign", "mmalign-share", "mmalign-noshare-nofused",
                                        "mmalign-noshare-smallchunks", "trl", "bare"}
    # the variants change what they name: the CPU default shares the prompt, "noshare" does not
    assert ran[("dpo", "full", "mmalign")]["share_prompt"] is True and ran[("dpo", "full", "mmalign-share")]["share_prompt"]
    assert all(e["share_prompt"] is False for (_, _, i), e in ran.items() if i.startswith("mmalign-noshare"))


@pytest.mark.slow
def test_gpu_bench_rng_section_dry_run_brings_back_flat_files(tmp_path):
    """The rng section (issue #17's rng-full, bench/gpu/run_rng.sh) on the tiny Llama: the same run_rng call with
    rng-full.yaml's sizes shrunk; the files the device tool returns (flat, at most 8) are all there."""
    import tarfile

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "run_gpu_bench.py"), "--dry-run",
                           "--sections", "rng", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["sections"]["rng"]["outcome"] == "finished" and data["errors"] == [], data
    (entry,) = [e for e in data["entries"] if e["section"] == "rng"]
    assert entry["status"] == "ok" and entry["config"] == "configs/text/rng-full.yaml"
    assert entry["sampling_device"] == "cpu" and set(entry["summary"]) == {"base", "DPO", "mDPO", "IPO", "mIPO"}
    assert 0 <= entry["win_rates"]["mIPO vs IPO"] <= 1 and _finite(entry["timings_s"]["total_s"])
    files = {"rng_results.json", "rng_results.md", "rng_histograms.png", "rng_runs.tar.gz"}
    assert set(data["sections"]["rng"]["files"]) == files
    assert {p.name for p in tmp_path.iterdir()} == files | {"gpu_bench.json", "workers.log"}  # nothing deeper
    with tarfile.open(tmp_path / "rng_runs.tar.gz") as bundle:
        names = set(bundle.getnames())
    assert {f"runs/{m}/metrics.jsonl" for m in ("DPO", "mDPO", "IPO", "mIPO")} <= names
    assert json.loads((tmp_path / "rng_results.json").read_text())["config"]["lora"]["r"] == 4  # the shrunk sizes
