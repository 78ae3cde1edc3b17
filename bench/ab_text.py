"""Interleaved A/B of the text benchmark across environments or code versions (not a test).

Each arm is an interpreter (a venv's python) and optionally a source tree to import mmalign from. Every repeat runs
``bench_text_dpo.py --repeats 1`` once per arm, alternating, so a change in machine load hits all arms alike; the
1-minute load average is recorded before and after each run. On a shared machine only the ratios within one run of
this script mean anything (medians over the interleaved repeats), never the absolute seconds.

    python bench/ab_text.py --arm pinned=.venv/bin/python --arm old=/work/venvs/old/bin/python \\
        --repeats 3 --json /tmp/ab.json -- --only tiny/dpo/lora/live --steps 10 --warmup 3
    python bench/ab_text.py --arm new=.venv/bin/python:. --arm base=.venv/bin/python:/tmp/base-tree -- --only /live/
    python bench/ab_text.py --arm two=.venv/bin/python --arm one=.venv/bin/python --arm-args "one=--threads 1" -- ...

Arguments after ``--`` go to every ``bench_text_dpo.py`` run (``--repeats`` and ``--json`` are set here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")


def parse_arm(spec: str) -> tuple[str, str, str]:
    """``NAME=PYTHON[:SOURCE_TREE]`` -> (name, python, tree); the tree defaults to this repository."""
    if "=" not in spec:
        raise SystemExit(f"--arm {spec!r}: expected NAME=PYTHON[:SOURCE_TREE]")
    name, rest = spec.split("=", 1)
    python, _, tree = rest.partition(":")
    return name, python, str(Path(tree or ROOT).resolve())


def arm_versions(python: str, tree: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in %r}))" % (VERSIONS,))
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=tree))
    versions = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}
    git = lambda *a: subprocess.run(["git", "-C", tree, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    versions["git"] = (git("rev-parse", "--short", "HEAD") + ("+uncommitted" if git("status", "--porcelain") else "")
                       if os.path.isdir(os.path.join(tree, ".git")) or os.path.isfile(os.path.join(tree, ".git"))
                       else "not a git tree")
    return versions


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME=PYTHON[:SOURCE_TREE]; two or more")
    parser.add_argument("--arm-args", action="append", default=[],
                        help="NAME=ARGS: extra bench arguments for one arm only, e.g. 'one=--threads 1'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(own)
    arms = [parse_arm(a) for a in args.arm]
    extra = {k: v.split() for k, _, v in (a.partition("=") for a in args.arm_args)}
    versions = {name: arm_versions(python, tree) for name, python, tree in arms}
    for name, v in versions.items():
        print(f"arm {name}: {v}", flush=True)
    raw: dict[str, dict[str, list]] = {name: {} for name, _, _ in arms}
    loads: dict[str, list] = {name: [] for name, _, _ in arms}
    with tempfile.TemporaryDirectory(prefix="ab-text-") as tmp:
        for repeat in range(args.repeats):
            for name, python, tree in arms:
                out = Path(tmp) / f"{name}-{repeat}.json"
                before = load1()
                # the tree's own bench script: it imports that tree's mmalign layout
                script = Path(tree) / "bench" / "bench_text_dpo.py"
                cmd = [python, str(script if script.exists() else ROOT / "bench" / "bench_text_dpo.py"), *bench_args, *extra.get(name, []), "--repeats", "1",
                       "--json", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=tree))
                if proc.returncode != 0:
                    raise SystemExit(f"arm {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                loads[name].append((before, load1()))
                for case, runs in json.loads(out.read_text())["raw"].items():
                    raw[name].setdefault(case, []).extend(runs)
                print(f"[{repeat + 1}/{args.repeats}] arm {name} done, load {before:.1f} -> {load1():.1f}", flush=True)
    summary = {}
    for name, cases in raw.items():
        summary[name] = {case: {"wall": statistics.median(t for r in runs for t in r["step_times"]),
                                "cpu": statistics.median(t for r in runs for t in r["cpu_step_times"]),
                                "peak_mib": statistics.median(r["peak_rss_mib"] for r in runs)}
                         for case, runs in cases.items()}
    print("\ncase / arm: wall s/step, CPU s/step, peak MiB; for mmalign: TRL's s/step / mmalign's (wall, CPU)")
    for case in sorted({c for cases in summary.values() for c in cases}):
        for name in summary:
            s = summary[name].get(case)
            if s is None:
                continue
            line = f"{case:36s} {name:10s} {s['wall']:.4f} {s['cpu']:.4f} {s['peak_mib']:6.0f}"
            trl = summary[name].get(case.rsplit("/", 2)[0] + "/live/trl")
            if case.endswith("/mmalign") and trl:
                line += f"   vs TRL {trl['wall'] / s['wall']:.2f}x wall, {trl['cpu'] / s['cpu']:.2f}x CPU"
            print(line)
    for name in loads:
        print(f"load average (1 min) around arm {name}'s runs: " + ", ".join(f"{a:.1f}->{b:.1f}" for a, b in loads[name]))
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "summary": summary, "loads": loads, "raw": raw,
                                               "bench_args": bench_args, "arms": arms, "arm_args": extra}, indent=1))


if __name__ == "__main__":
    main()
