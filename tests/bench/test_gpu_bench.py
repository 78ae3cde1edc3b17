"""bench/gpu's bookkeeping (fast): the case log and runner, the worker restart after a crash, and the summaries
(MFU, ratios against the peers, the issue's goals). The whole script's CPU dry run: test_gpu_dry_run.py (slow)."""
import json
import math
import sys
import time
from pathlib import Path

import pytest

GPU_BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu"
sys.path.insert(0, str(GPU_BENCH))

from gpu_common import CaseLog, CaseRunner  # noqa: E402
from gpu_report import summarise, table  # noqa: E402


def test_case_runner_records_results_errors_and_budget_skips(tmp_path):
    log = CaseLog(tmp_path / "cases.jsonl")
    runner = CaseRunner(log, time.time() + 60, "text")
    assert runner.run("a", "kind", lambda: {"x": 1.0})["status"] == "ok"
    failed = runner.run("b", "kind", lambda: 1 / 0)
    assert failed["status"] == "error" and "ZeroDivisionError" in failed["error"]
    assert runner.run("a", "kind", lambda: {"x": 2.0}) is None  # finished cases are not run again
    late = CaseRunner(log, time.time() - 1, "text")
    assert late.run("c", "kind", lambda: {"x": 3.0}) is None
    statuses = {e["case"]: e["status"] for e in log.results()}
    assert statuses == {"a": "ok", "b": "error", "c": "skipped"}
    assert log.unfinished_started() == []


def test_worker_restarted_past_the_case_it_died_in(tmp_path):
    from run_gpu_bench import run_worker

    # A worker that dies (exit 7) in case "crash" on its first start, then finishes the remaining case.
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(GPU_BENCH)!r})\n"
        "from gpu_common import CaseLog, CaseRunner\n"
        "log = CaseLog(sys.argv[1]); runner = CaseRunner(log, time.time() + 60, 's')\n"
        "runner.run('first', 'k', lambda: {'v': 1.0})\n"
        "def crash():\n"
        "    sys.stdout.flush(); import os; os._exit(7)\n"
        "runner.run('crash', 'k', crash)\n"
        "runner.run('last', 'k', lambda: {'v': 2.0})\n")
    log = CaseLog(tmp_path / "cases.jsonl")
    result = run_worker("s", True, log, time.time() + 60, tmp_path / "out.log",
                        cmd=[sys.executable, str(script), str(log.path)])
    assert result["outcome"] == "finished" and result["starts"] == 2
    statuses = {e["case"]: e["status"] for e in log.results()}
    assert statuses == {"first": "ok", "crash": "error", "last": "ok"}
    crash = next(e for e in log.results() if e["case"] == "crash")
    assert "exit 7" in crash["error"]


def _text(impl, step, objective="dpo", mode="lora", seq_len=2048, tokens=16384, params=1_000_000_000):
    return {"section": "text", "status": "ok", "impl": impl, "objective": objective, "finetuning": mode,
            "seq_len": seq_len, "case": f"{objective}/{mode}/{impl}", "step_times_s": [step, step],
            "tokens_per_step": tokens, "model_flops_per_step": 8 * params * tokens, "peak_memory_mib": 1024.0}


def test_summaries_mfu_ratios_and_goals():
    entries = [
        {"section": "device", "status": "ok", "case": "matmul", "tflops": 800.0},
        _text("mmalign", 0.5), _text("trl", 1.0), _text("bare", 0.4),
        _text("mmalign", 0.5, mode="full"),
        {"section": "image", "status": "ok", "kind": "memory", "attention": "sdpa", "gradient_checkpointing": False,
         "variant": "mmalign_lora", "peak_memory_mib": 600.0, "case": "m1"},
        {"section": "image", "status": "ok", "kind": "memory", "attention": "sdpa", "gradient_checkpointing": False,
         "variant": "naive_full", "peak_memory_mib": 1000.0, "case": "m2"},
        {"section": "image", "status": "ok", "kind": "time", "attention": "sdpa", "gradient_checkpointing": False,
         "case": "t", "variants": {"mmalign_lora": {"step_times_s": [0.1], "median_step_s": 0.1, "images_per_step": 8,
                                                     "images_per_s": 80.0},
                                   "naive_full": {"step_times_s": [0.15], "median_step_s": 0.15, "images_per_step": 8,
                                                  "images_per_s": 53.3}}},
        {"section": "image", "status": "error", "case": "broken", "error": "boom"},
    ]
    summary = summarise(entries)
    mmalign = next(r for r in summary["text_summary"] if r["impl"] == "mmalign" and r["finetuning"] == "lora")
    assert mmalign["speed_vs_trl"] == pytest.approx(2.0) and mmalign["speed_vs_bare"] == pytest.approx(0.8)
    assert mmalign["tokens_per_s"] == pytest.approx(16384 / 0.5)
    assert mmalign["mfu"] == pytest.approx(8e9 * 16384 / 0.5 / 800e12)
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals["mmalign DPO LoRA step >= 1.5x TRL's (L=2048)"]["met"] is True
    full_mfu = next(g for name, g in goals.items() if name.startswith("MFU"))
    assert full_mfu["value"] == pytest.approx(8e9 * 16384 / 0.5 / 800e12) and full_mfu["met"] is False
    speed = next(g for name, g in goals.items() if name.startswith("Diffusion-DPO LoRA step"))
    memory = next(g for name, g in goals.items() if "memory" in name)
    assert speed["value"] == pytest.approx(1.5) and speed["met"] is True
    assert memory["value"] == pytest.approx(0.6) and memory["met"] is True
    assert summary["errors"] == [{"section": "image", "case": "broken", "error": "boom"}]
    data = {"meta": {"dry_run": False}, "sections": {}, "entries": entries, **summary}
    printed = table(data)
    assert "800 TFLOP/s" in printed and "errors: 1" in printed
    json.dumps(summary)  # the JSON file takes it as is


def test_missing_measurements_give_unmet_goals_not_errors():
    summary = summarise([])
    assert summary["text_summary"] == [] and summary["image_summary"] == []
    assert all(g["met"] is None and math.isnan(g["value"]) for g in summary["goals"])


def test_rng_collect_copies_a_partial_run_flat(tmp_path):
    """What the rng section brings back when its run was killed after two methods: the metrics written so far."""
    import tarfile

    from gpu_rng import collect

    work, out = tmp_path / "work", tmp_path / "out"
    for method in ("DPO", "mDPO"):
        (work / "runs" / method).mkdir(parents=True)
        (work / "runs" / method / "metrics.jsonl").write_text('{"step": 1}\n')
    (work / "config.yaml").write_text("model: smollm2\n")
    out.mkdir()
    assert collect(work, out) == ["rng_runs.tar.gz"]  # no results.json: the run did not finish
    with tarfile.open(out / "rng_runs.tar.gz") as bundle:
        assert sorted(bundle.getnames()) == ["config.yaml", "runs/DPO/metrics.jsonl", "runs/mDPO/metrics.jsonl"]
    (work / "results.json").write_text("{}")
    assert collect(work, out)[0] == "rng_results.json" and (out / "rng_results.json").read_text() == "{}"
    assert collect(tmp_path / "never-started", out) == []


def test_rng_section_is_not_in_the_default_plan_and_has_a_budget():
    import run_gpu_bench

    assert run_gpu_bench.BUDGETS["rng"] + run_gpu_bench.BUDGETS["device"] <= 430  # run_rng.sh's --deadline-s
    assert "rng" in run_gpu_bench.DRY_BUDGETS
