"""Experiment (not a test): pool ``mmalign_experiments/debias/seeds.py`` runs made on several occupation splits.

Each run of ``debias_seeds.py`` writes, per training seed, the paired per-occupation difference of the reference
method (mDPO) against every other method. This script reads those from one ``seeds.json`` per split.

The unit of the pooled analysis is the **training seed**, not the run. Runs on different splits at one seed
share that seed's randomness: the draw of the single-sample pairs (seeded by ``groups.seed + training.seed``), the
data-order and (t, ε) generators. Their differences are correlated, so counting them as independent would
overstate the evidence. Per seed the splits' differences are averaged; over seeds the script reports:

- the mean ± standard error and the t ratio;
- how many seeds are positive;
- the exact two-sided sign test (seeds with a difference of exactly zero are dropped, as the test requires, and
  counted apart).

It also gives each split alone, and the correlation across splits of the per-seed differences.

    .venv/bin/python -m mmalign_experiments.debias.pool outputs/debias-filter-gender outputs/debias-filter-gender-split1
        [--seeds 6 7 8 9 10 11] [--output outputs/debias-pooled.json]

``--seeds`` keeps only those seeds (e.g. a replication on fresh seeds); by default the seeds every split holds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ATTRIBUTES = ("simpson_gender", "simpson_race")


def sign_test_p(positives: int, negatives: int) -> float:
    """Exact two-sided sign test over the non-zero differences: the probability, if each were positive with
    probability 1/2, of a split at least as uneven as ``positives`` : ``negatives``."""
    n = positives + negatives
    if n == 0:
        return 1.0
    extreme = max(positives, negatives)
    tail = sum(math.comb(n, k) for k in range(extreme, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarise(differences: list[float]) -> dict:
    """Mean, standard error (None for a single value), t ratio, counts and sign test of paired differences."""
    mean = statistics.mean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else None
    positives = sum(d > 0 for d in differences)
    negatives = sum(d < 0 for d in differences)
    return {"n": len(differences), "mean": mean, "se": se, "t": mean / se if se else None, "positive": positives,
            "zero": len(differences) - positives - negatives, "sign_test_p": sign_test_p(positives, negatives)}


def load_splits(folders: list[str], seeds: list[int] | None) -> tuple[list[int], dict]:
    """(the seeds used, {split folder: {other method: {attribute: {seed: difference}}}})."""
    splits, held = {}, []
    for folder in folders:
        path = Path(folder) / "seeds.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no seeds.json (run mmalign_experiments/debias/seeds.py --output {folder} first)")
        data = json.loads(path.read_text())
        held.append(set(data["seeds"]))
        splits[folder] = {other: {a: dict(zip(data["seeds"], d[a]["per_seed"])) for a in ATTRIBUTES}
                          for other, d in data["differences"].items()}
    common = set.intersection(*held)
    if seeds is not None:
        missing = {f: sorted(set(seeds) - h) for f, h in zip(folders, held) if set(seeds) - h}
        if missing:
            raise SystemExit(f"seeds missing: {missing}")
        common = set(seeds)
    if not common:
        raise SystemExit(f"the splits share no seed: {dict(zip(folders, map(sorted, held)))}")
    return sorted(common), splits


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.debias.pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="outputs of mmalign_experiments/debias/seeds.py, one per occupation split")
    parser.add_argument("--seeds", type=int, nargs="+", help="keep only these training seeds")
    parser.add_argument("--output", help="also write the table as JSON here")
    args = parser.parse_args()

    seeds, splits = load_splits(args.folders, args.seeds)
    others = [m for m in next(iter(splits.values())) if all(m in s for s in splits.values())]
    table = {}
    for other in others:
        table[other] = {}
        for attribute in ATTRIBUTES:
            per_split = {f: [s[other][attribute][seed] for seed in seeds] for f, s in splits.items()}
            per_seed = [statistics.mean(values) for values in zip(*per_split.values())]
            entry = {"per_seed": summarise(per_seed), "per_split": {f: summarise(v) for f, v in per_split.items()}}
            if len(per_split) == 2 and len(seeds) > 2:
                first, second = per_split.values()
                entry["correlation_across_splits"] = statistics.correlation(first, second)
            table[other][attribute] = entry

    def cell(s: dict) -> str:
        spread = f" ± {s['se']:.3f} (t = {s['t']:.1f})" if s["se"] else ""
        zeros = f", {s['zero']} zero" if s["zero"] else ""
        return f"{s['mean']:+.3f}{spread}; {s['positive']}/{s['n']} > 0{zeros}, sign test p = {s['sign_test_p']:.3g}"

    print(f"Paired differences, reference − other; seeds {seeds}; the unit is the seed (splits averaged)\n")
    print("| other | where | Simpson gender | Simpson race |\n|---|---|---|---|")
    for other, by_attribute in table.items():
        print(f"| {other} | per seed, splits averaged | "
              + " | ".join(cell(by_attribute[a]["per_seed"]) for a in ATTRIBUTES) + " |")
        for folder in splits:
            print(f"| | {folder} alone | "
                  + " | ".join(cell(by_attribute[a]["per_split"][folder]) for a in ATTRIBUTES) + " |")
        if "correlation_across_splits" in by_attribute[ATTRIBUTES[0]]:
            print("| | correlation of the splits' per-seed differences | "
                  + " | ".join(f"{by_attribute[a]['correlation_across_splits']:+.2f}" for a in ATTRIBUTES) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"folders": args.folders, "seeds": seeds, "table": table}, indent=1))


if __name__ == "__main__":
    main()
