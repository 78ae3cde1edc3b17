"""Pools several runs of ``bench/bench_text_dpo.py`` (their ``--json`` files) into one table (not a test).

Per case: the median of every timed step of every run, the ratio to TRL and to the bare loop, the range of the
single runs' ratios to TRL, the median peak RSS, and the number of runs — the figures of bench/RESULTS.md.

    .venv/bin/python bench/pool_text_results.py bench/results/text_results_lora_direct.json bench/results/text_results_lora_direct_2.json
"""
from __future__ import annotations

import argparse
import json
import statistics


def per_run_ratios(raw: dict[str, list[dict]]) -> dict[str, list[float]]:
    """TRL's median CPU s/step over this case's, for each repeat (the runs of one repeat are neighbours in time)."""
    ratios = {}
    for name, runs in raw.items():
        trl = raw.get(f"{name.rsplit('/', 2)[0]}/live/trl")
        if trl and not name.endswith("/live/trl"):
            ratios[name] = [statistics.median(t["cpu_step_times"]) / statistics.median(r["cpu_step_times"])
                            for r, t in zip(runs, trl)]
    return ratios


def pooled_rows(paths: list[str], variant: str = "live") -> list[str]:
    steps: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    run_medians: dict[str, list[float]] = {}
    for path in paths:
        with open(path) as handle:
            raw = json.load(handle)["raw"]
        for case, runs in raw.items():
            for run in runs:
                steps.setdefault(case, []).extend(run["step_times"])
                peaks.setdefault(case, []).append(run["peak_rss_mib"])
                run_medians.setdefault(case, []).append(statistics.median(run["step_times"]))
    rows = []
    for case in steps:
        model, loss, mode, case_variant, impl = case.split("/")
        if impl != "mmalign" or case_variant != variant:
            continue
        peer = {i: f"{model}/{loss}/{mode}/{variant}/{i}" for i in ("trl", "bare")}
        if not all(p in steps for p in peer.values()):
            continue
        ours, trl, bare = (statistics.median(steps[c]) for c in (case, peer["trl"], peer["bare"]))
        ratios = [t / m for t, m in zip(run_medians[peer["trl"]], run_medians[case])]
        peak = " / ".join(f"{statistics.median(peaks[c]):.0f}" for c in (case, peer["trl"], peer["bare"]))
        rows.append(f"| {model} {loss}, {mode} | {ours:.4f} | {trl:.4f} | {bare:.4f} | {trl / ours:.2f}× | "
                    f"{bare / ours:.2f}× | {min(ratios):.2f}–{max(ratios):.2f}× | {peak} | {len(run_medians[case])} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by bench_text_dpo.py --json")
    parser.add_argument("--variant", default="live", help="the mmalign variant compared with TRL and the bare loop")
    args = parser.parse_args()
    print("| case | mmalign s/step | TRL | bare | vs TRL | vs bare | per-run vs TRL | peak MiB mmalign / TRL / bare | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(pooled_rows(args.results, args.variant)))


if __name__ == "__main__":
    main()
