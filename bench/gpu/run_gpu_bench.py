"""mmalign's first GPU figures in one device call (< 8 minutes): text and image training steps at real sizes vs
their peers, the card's measured bf16 matmul rate (the MFU denominator) and one run of the test suite. The section
``rng`` (not in the default plan: it needs the whole call) runs issue #17's rng-full experiment (gpu_rng.py,
bench/gpu/run_rng.sh).

    bash bench/gpu/run.sh                                   # on the GPU machine (installs the carried wheels)
    .venv/bin/python bench/gpu/run_gpu_bench.py --dry-run   # here: tiny sizes, CPU, float32, no suite

Sections run one after another, each in its own worker process under its own time budget and all under one global
deadline; a section that runs out of time skips its remaining cases, a case that fails records its error, and a
worker that dies is restarted past the case it died in. The full numbers go to ``<out>/gpu_bench.json`` (rewritten
after every section); a short table is printed last. See bench/gpu/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import ROOT, CaseLog  # noqa: E402
from gpu_report import summarise, table  # noqa: E402

# Seconds. The suite gets what the earlier sections leave before the global deadline.
BUDGETS = {"device": 25, "text": 180, "image": 100, "rng": 400}
DEADLINE_S = 445
# Generous for the dry run (a loaded 2-CPU box): it takes about a minute and a half; the limits only stop a hang.
DRY_BUDGETS = {"device": 60, "text": 180, "image": 180, "rng": 300}
DRY_DEADLINE_S = 420
LOG_LIMIT = 8 * 2**20
GRACE_S = 20  # a worker past its section deadline (a case already running) is killed this much later
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ worker side
def device_section(dry_run: bool, log: CaseLog, deadline_at: float) -> None:
    import torch

    from gpu_common import CaseRunner, matmul_tflops, pick_device

    device = pick_device(dry_run)
    if dry_run:
        torch.set_num_threads(1)
    runner = CaseRunner(log, deadline_at, "device")

    def info() -> dict:
        out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            out.update(name=props.name, memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
        else:
            out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        from importlib import metadata

        for package in ("transformers", "peft", "accelerate", "diffusers", "trl", "datasets", "xformers"):
            try:  # the installed version, without the seconds an import of each would cost
                out[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                out[package] = "not installed"
        return out

    def rate() -> dict:
        dtype, size = (torch.float32, 512) if dry_run else (torch.bfloat16, 8192)
        rates = [matmul_tflops(device, dtype, size, repeats=5 if dry_run else 20) for _ in range(3)]
        return {"dtype": str(dtype).replace("torch.", ""), "size": size, "tflops_runs": rates, "tflops": max(rates)}

    runner.run("info", "info", info)
    runner.run("matmul", "matmul", rate)


def worker_main(section: str, dry_run: bool, log_path: str, deadline_at: float, dtype: str | None) -> None:
    log = CaseLog(log_path)
    if section == "device":
        device_section(dry_run, log, deadline_at)
    elif section == "text":
        from gpu_text import run_section

        run_section(dry_run, log, deadline_at, dtype)
    elif section == "image":
        from gpu_image import run_section

        run_section(dry_run, log, deadline_at, dtype)
    elif section == "rng":
        from gpu_rng import run_section

        run_section(dry_run, log, deadline_at, dtype)
    else:
        raise ValueError(f"unknown section {section!r}")


# ------------------------------------------------------------------------------------------------ driver side
def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_worker(section: str, dry_run: bool, log: CaseLog, deadline_at: float, output: Path, cmd=None,
               dtype: str | None = None, env_extra: dict | None = None) -> dict:
    """Runs (and after a crash restarts, past the case it died in) one section's worker until it finishes, its
    deadline passes, or it dies without progress. ``cmd``: another worker command line (tests)."""
    if cmd is None:
        cmd = [sys.executable, __file__, "--worker", section, "--case-log", str(log.path), "--deadline-at",
               str(deadline_at)] + (["--dry-run"] if dry_run else []) + (["--dtype", dtype] if dtype else [])
    env = dict(os.environ, **WORKER_ENV, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    starts, outcome = 0, "not started: no time left"
    while time.time() < deadline_at - 2:
        before = len(log.entries())
        starts += 1
        with open(output, "a") as out:
            out.write(f"\n===== {section} worker, start {starts} =====\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline_at - time.time() + GRACE_S))
                outcome = "finished" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, outcome = -9, "killed at the section deadline"
        for case in log.unfinished_started():
            log.write({"section": section, "case": case, "status": "error",
                       "error": f"the worker ended ({outcome}) during this case", "output_tail": tail(output, 2000)})
        if rc == 0 or rc == -9 or len(log.entries()) == before:
            break  # done, out of time, or dying before any progress (restarting would only repeat it)
    return {"outcome": outcome, "starts": starts, "output_tail": tail(output, 1500) if outcome != "finished" else ""}


def suite_section(deadline_at: float, out_dir: Path) -> dict:
    """The whole main suite once (pytest -q), in parallel with pytest-xdist when it is there; test files that
    launch torchrun (a fixed rendezvous port) run afterwards on their own."""
    # that machine has neither the data folder nor the weight packages: their tests are reported as skipped there
    env = dict(os.environ, **WORKER_ENV, MMALIGN_ALLOW_MISSING_ASSETS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    distributed = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                         if "torch.distributed.run" in p.read_text(errors="replace"))
    try:
        import xdist  # noqa: F401

        parallel = ["-n", "6"]
    except ImportError:
        parallel = []
    runs = [["-q", *parallel, *[f"--ignore={f}" for f in distributed]]] + ([["-q", *distributed]] if distributed else [])
    log_path = out_dir / "suite.log"
    results = []
    for extra in runs:
        left = deadline_at - time.time()
        if left < 10:
            results.append({"args": extra, "status": "skipped", "reason": "no time left"})
            continue
        start = time.perf_counter()
        with open(log_path, "a") as out:
            out.write(f"\n===== python -m pytest {' '.join(extra)} =====\n")
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *extra], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
                status = "finished"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, status = None, "timeout"
        text = tail(log_path, 200_000).split("===== python -m pytest")[-1]
        summary = [line.strip("= ") for line in text.splitlines()
                   if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)\b|no tests ran", line)]
        results.append({"args": extra, "status": status, "exit_code": rc, "wall_s": time.perf_counter() - start,
                        "summary_line": summary[-1] if summary else "",
                        "progress_chars": {c: sum(line.count(c) for line in text.splitlines()
                                                  if re.match(r"^[.FEsxX]+(\s+\[\s*\d+%\])?$", line.strip()))
                                           for c in ".FEsxX"},
                        "failures": [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))][:40]})
    return {"runs": results, "distributed_files_run_alone": distributed, "parallel": parallel}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # never a half-written results file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU in float32, no suite run")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu-bench"),
                        help="folder of gpu_bench.json and the logs (default: $OUT, else outputs/gpu-bench)")
    parser.add_argument("--sections", default="device,text,image,suite",
                        help="comma-separated subset, e.g. 'device,image' for a shorter rerun")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"global deadline in seconds (default {DEADLINE_S}; dry run {DRY_DEADLINE_S})")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every section budget and the global deadline (e.g. 3 for a slow rehearsal)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="override the weights' dtype (e.g. a bf16 rehearsal of the dry run on the CPU)")
    parser.add_argument("--text-plan", choices=["full", "focused"], default="full",
                        help="text cases: full (every objective/mode/length x mmalign/TRL/bare) or focused (mmalign's "
                             "settings on and off beside TRL: gpu_text.focused_cases)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-log", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.dry_run, args.case_log, args.deadline_at, args.dtype)
        return

    os.environ["GPU_BENCH_TEXT_PLAN"] = args.text_plan  # the text worker inherits it
    started = time.time()
    deadline_at = started + args.budget_scale * (args.deadline_s or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S))
    budgets = {k: v * args.budget_scale for k, v in (DRY_BUDGETS if args.dry_run else BUDGETS).items()}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"device", "text", "image", "suite", "rng"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; allowed: device, text, image, suite, rng")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_bench.json"
    data: dict = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": args.dry_run,
                           "dtype_override": args.dtype, "text_plan": args.text_plan,
                           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
                           "deadline_s": deadline_at - started, "budgets_s": budgets, "host": platform.node(),
                           "cpus": os.cpu_count()},
                  "sections": {}, "entries": []}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for section in sections:
            start = time.time()
            if section == "suite":
                if args.dry_run:
                    data["sections"]["suite"] = {"status": "skipped", "reason": "dry run"}
                    continue
                result = suite_section(deadline_at, out_dir)
            else:
                section_deadline = min(start + budgets[section], deadline_at)
                log = CaseLog(Path(tmp) / f"{section}.jsonl")
                # rng: the run folder stays outside out_dir (only 8 files come back); its files are copied flat
                work = Path(tmp) / "rng-work" / "rng-full"
                extra = {"GPU_BENCH_RNG_WORK": str(work)} if section == "rng" else None
                result = run_worker(section, args.dry_run, log, section_deadline, out_dir / "workers.log",
                                    dtype=args.dtype, env_extra=extra)
                data["entries"].extend(log.results())
                if section == "rng":
                    from gpu_rng import collect

                    result["files"] = collect(work, out_dir)
                    if (out_dir / "rng_results.md").is_file():
                        print((out_dir / "rng_results.md").read_text(), flush=True)
            result.update(budget_s=round(min(budgets.get(section, 1e9), deadline_at - start), 1),
                          wall_s=round(time.time() - start, 1))
            data["sections"][section] = result
            data.update(summarise(data["entries"]))
            write_json(json_path, data)
            print(f"[{time.time() - started:5.0f} s] {section}: {result.get('outcome', 'done')} in {result['wall_s']} s",
                  flush=True)
    for name in ("workers.log", "suite.log"):  # the device tool returns files of at most 16 MiB
        path = out_dir / name
        if path.exists() and path.stat().st_size > LOG_LIMIT:
            with open(path, "rb") as handle:
                handle.seek(-LOG_LIMIT, os.SEEK_END)
                kept = handle.read()
            path.write_bytes(b"[... cut: only the last part of this log is kept ...]\n" + kept)
    data["meta"]["wall_s"] = round(time.time() - started, 1)
    data.update(summarise(data["entries"]))
    write_json(json_path, data)
    print(f"\nfull numbers: {json_path}")
    print(table(data))


if __name__ == "__main__":
    main()
