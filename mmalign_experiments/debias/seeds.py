"""Experiment (not a test): the debiasing command's methods over several training seeds.

One debias run per training seed (the same occupations, images, groups and held-out evaluation seeds; another
data order, (t, ε) draw and draw of the single-sample DPO pairs — seed 0 keeps the default run's draw), then per
method the mean ± standard deviation over seeds of the averaged Simpson indices, gaps, no-face rate, the
classifiers' mean confidence and the denoising-loss change, and the paired per-occupation differences of mDPO
against every other method (mean over seeds and occupations, with the standard error over seeds of the per-seed
mean difference).

    .venv/bin/python -m mmalign_experiments.debias.seeds --seeds 0 1 2 [--output outputs/debias-seeds] [--set KEY=VALUE ...]
        [--reuse] [--merge outputs/other-run ...]

``--reuse`` reads a seed's finished ``report.json`` instead of running it again. ``--merge DIR`` adds the methods of
another run's per-seed reports (the same seeds; a name already present becomes ``name@DIR``) to the tables, after
checking that its base model's held-out results are identical (the same evaluation). The merged methods may have
been trained on other groups or settings: say so when quoting them.

Writes ``<output>/seeds.json`` and ``<output>/seeds.md``; the runs go to ``<output>/seed<N>/``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

METRICS = ("simpson_gender", "simpson_race", "gender_gap", "race_gap", "no_face_rate", "mean_confidence_gender",
           "mean_confidence_race", "denoising_loss_change")


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _per_occupation_difference(report: dict, method: str, other: str, key: str) -> float:
    ours, theirs = report["per_occupation"][method], report["per_occupation"][other]
    return statistics.mean(ours[o][key] - theirs[o][key] for o in ours)


def _merge_methods(report: dict, other: dict, run_name: str, where: str) -> None:
    """Add ``other``'s methods to ``report`` (in place), a name this run already has as ``name@run_name``; both runs
    must have measured the same base model identically (the same evaluation images, classifier and seeds)."""
    if other["per_occupation"]["base"] != report["per_occupation"]["base"]:
        raise ValueError(f"{where}: its base model's held-out results differ from this run's (other evaluation "
                         "images, classifier or seeds), so its methods cannot be compared here")
    for method in other["summary"]:
        if method == "base":
            continue
        name = f"{method}@{run_name}" if method in report["summary"] else method
        report["summary"][name] = other["summary"][method]
        report["per_occupation"][name] = other["per_occupation"][method]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.debias.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="outputs/debias-seeds")
    parser.add_argument("--reference-method", default="mdpo", help="the method the paired differences start from")
    parser.add_argument("--reuse", action="store_true", help="read finished seeds' report.json instead of re-running")
    parser.add_argument("--merge", nargs="*", default=[], metavar="DIR",
                        help="other runs of this script whose methods join the tables (same seeds and evaluation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the debias config (repeatable)")
    args = parser.parse_args()

    from mmalign_experiments.debias import run

    output = Path(args.output)
    reports = {}
    for seed in args.seeds:
        finished = output / f"seed{seed}" / "report.json"
        if args.reuse and finished.is_file():
            reports[seed] = json.loads(finished.read_text())
            continue
        started = time.time()
        reports[seed] = run({}, [f"output_dir={output / f'seed{seed}'}", f"training.seed={seed}", *args.overrides])
        print(f"seed {seed}: {time.time() - started:.0f} s", flush=True)
    for other_run in args.merge:
        for seed in args.seeds:
            _merge_methods(reports[seed], json.loads((Path(other_run) / f"seed{seed}" / "report.json").read_text()),
                           Path(other_run).name, f"{other_run}/seed{seed}")

    methods = list(reports[args.seeds[0]]["summary"])
    summary = {m: {k: [reports[s]["summary"][m].get(k) for s in args.seeds] for k in METRICS} for m in methods}
    ref = args.reference_method
    if ref not in methods:
        raise SystemExit(f"--reference-method {ref!r} is not among the methods {methods}; the runs are saved, re-run "
                         "with --reuse and another --reference-method (or --merge a run that has it)")
    differences = {}
    for other in (m for m in methods if m != ref):
        differences[other] = {}
        for key in ("simpson_gender", "simpson_race"):
            per_seed = [_per_occupation_difference(reports[s], ref, other, key) for s in args.seeds]
            spread = statistics.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
            differences[other][key] = {"per_seed": per_seed, "mean": statistics.mean(per_seed), "se_over_seeds": spread}

    lines = [f"# Debias methods over training seeds {args.seeds}", "",
             "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for m in methods:
        cells = [_mean_sd([v for v in summary[m][k] if v is not None]) if any(v is not None for v in summary[m][k])
                 else "" for k in METRICS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired per held-out occupation, {ref} − other (mean over seeds; ± standard error over seeds; "
              "per-seed values):", "", "| other | Simpson gender | Simpson race |", "|---|---|---|"]
    for other, d in differences.items():
        cells = [f"{d[k]['mean']:+.3f} ± {d[k]['se_over_seeds']:.3f} ({', '.join(f'{v:+.3f}' for v in d[k]['per_seed'])})"
                 for k in ("simpson_gender", "simpson_race")]
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (output / "seeds.md").write_text(text)
    (output / "seeds.json").write_text(json.dumps({"seeds": args.seeds, "summary": summary, "differences": differences,
                                                    "timings_s": {s: r["timings_s"] for s, r in reports.items()}},
                                                   indent=1))
    print(text)


if __name__ == "__main__":
    main()
