"""Experiment (not a test): pool ``bench/debias_seeds.py`` runs made on several occupation splits.

Each run of ``debias_seeds.py`` writes, per training seed, the paired per-occupation difference of the reference
method (mDPO) against every other method. This script takes those per-run differences from one or more
``seeds.json`` files (one per split), and per compared method and attribute reports the mean ± standard error over
all runs, how many runs are positive, and the exact two-sided sign-test p-value (no distributional assumption:
under "no difference" each run is positive with probability 1/2). Per split too, since runs on one split share its
held-out occupations.

    .venv/bin/python bench/debias_pool.py outputs/debias-filter-gender outputs/debias-filter-gender-split1
        [--seeds 6 7 8 9 10 11] [--output outputs/debias-pooled.json]

``--seeds`` keeps only those seeds (e.g. a replication on fresh seeds); by default every seed each file holds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ATTRIBUTES = ("simpson_gender", "simpson_race")


def sign_test_p(positives: int, runs: int) -> float:
    """Exact two-sided sign test: the probability, if each run were positive with probability 1/2, of a count at
    least as far from runs/2 as ``positives``."""
    extreme = max(positives, runs - positives)
    tail = sum(math.comb(runs, k) for k in range(extreme, runs + 1)) / 2 ** runs
    return min(1.0, 2 * tail)


def summarise(differences: list[float]) -> dict:
    mean = statistics.mean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    positives = sum(d > 0 for d in differences)
    return {"runs": len(differences), "mean": mean, "se": se, "positive": positives,
            "sign_test_p": sign_test_p(positives, len(differences))}


def load_runs(folders: list[str], seeds: list[int] | None) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{split folder: {other method: {attribute: per-run differences}}}, in seed order."""
    runs = {}
    for folder in folders:
        path = Path(folder) / "seeds.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no seeds.json (run bench/debias_seeds.py --output {folder} first)")
        data = json.loads(path.read_text())
        keep = [i for i, s in enumerate(data["seeds"]) if seeds is None or s in seeds]
        if seeds is not None and len(keep) != len(seeds):
            missing = sorted(set(seeds) - set(data["seeds"]))
            raise SystemExit(f"{path}: seeds {missing} are missing (it holds {data['seeds']})")
        runs[folder] = {other: {a: [d[a]["per_seed"][i] for i in keep] for a in ATTRIBUTES}
                        for other, d in data["differences"].items()}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="outputs of bench/debias_seeds.py, one per occupation split")
    parser.add_argument("--seeds", type=int, nargs="+", help="keep only these training seeds")
    parser.add_argument("--output", help="also write the table as JSON here")
    args = parser.parse_args()

    runs = load_runs(args.folders, args.seeds)
    others = [m for m in next(iter(runs.values())) if all(m in r for r in runs.values())]
    table = {}
    for other in others:
        table[other] = {}
        for attribute in ATTRIBUTES:
            per_split = {folder: summarise(r[other][attribute]) for folder, r in runs.items()}
            pooled = summarise([d for r in runs.values() for d in r[other][attribute]])
            table[other][attribute] = {"pooled": pooled, "per_split": per_split}

    def cell(s: dict) -> str:
        return f"{s['mean']:+.3f} ± {s['se']:.3f} ({s['positive']}/{s['runs']} > 0, sign test p = {s['sign_test_p']:.3g})"

    print(f"Paired mean differences, reference − other (± standard error over runs); splits: {', '.join(runs)}; "
          f"seeds: {args.seeds or 'all'}\n")
    print("| other | where | Simpson gender | Simpson race |\n|---|---|---|---|")
    for other, by_attribute in table.items():
        print(f"| {other} | all runs | " + " | ".join(cell(by_attribute[a]["pooled"]) for a in ATTRIBUTES) + " |")
        for folder in runs:
            print(f"| | {folder} | " + " | ".join(cell(by_attribute[a]["per_split"][folder]) for a in ATTRIBUTES)
                  + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"folders": args.folders, "seeds": args.seeds, "table": table},
                                                indent=1))


if __name__ == "__main__":
    main()
