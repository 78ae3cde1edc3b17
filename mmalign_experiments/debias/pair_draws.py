"""Experiment (not a test): does single-sample DPO's result follow the draw of its one pair per group?

For every seed folder of ``mmalign_experiments/debias/seeds.py`` runs, reads the drawn pairs (``data/pairs-1-per-group.jsonl``,
the requested race × gender cell of each chosen image) and the held-out results (``report.json``), prints per seed
the share of female and of white chosen images among the draws beside the Simpson indices of single-sample DPO
(and of mDPO, for reference), and per folder the correlation over seeds of the female share with DPO's gender index
and of the white share with its race index.

    .venv/bin/python -m mmalign_experiments.debias.pair_draws outputs/debias-filter-gender outputs/debias-filter-gender-split1
        [--method dpo] [--reference mdpo]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def draw_shares(run: Path) -> tuple[float, float]:
    """(female share, white share) of the chosen images drawn for the single-sample pairs of one run."""
    path = run / "data" / "pairs-1-per-group.jsonl"
    cells = [json.loads(line)["chosen_cells"][0] for line in path.read_text().splitlines() if line.strip()]
    if not cells:
        raise SystemExit(f"{path}: no pairs")
    return (sum(gender == "female" for _, gender in cells) / len(cells),
            sum(race == "white" for race, _ in cells) / len(cells))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.debias.pair_draws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="outputs of mmalign_experiments/debias/seeds.py (folders holding seed<N>/)")
    parser.add_argument("--method", default="dpo", help="the single-sample method's name in the reports")
    parser.add_argument("--reference", default="mdpo", help="a method shown beside it")
    args = parser.parse_args()

    for folder in args.folders:
        runs = sorted(Path(folder).glob("seed*/report.json"), key=lambda p: int(p.parent.name.removeprefix("seed")))
        rows = []
        for report_path in runs:
            summary = json.loads(report_path.read_text())["summary"]
            if args.method not in summary:
                continue
            female, white = draw_shares(report_path.parent)
            rows.append((report_path.parent.name, female, white, summary[args.method], summary.get(args.reference)))
        print(f"\n{folder}\n| seed | female draws | white draws | {args.method} gender | {args.method} race | "
              f"{args.reference} gender | {args.reference} race |\n|---|---|---|---|---|---|---|")
        for seed, female, white, ours, reference in rows:
            ref = (f"{reference['simpson_gender']:.3f} | {reference['simpson_race']:.3f}" if reference else " | ")
            print(f"| {seed} | {female:.2f} | {white:.2f} | {ours['simpson_gender']:.3f} | {ours['simpson_race']:.3f} "
                  f"| {ref} |")
        if len(rows) > 2:
            gender = statistics.correlation([r[1] for r in rows], [r[3]["simpson_gender"] for r in rows])
            race = statistics.correlation([r[2] for r in rows], [r[3]["simpson_race"] for r in rows])
            print(f"\ncorrelation over {len(rows)} seeds: female draws vs {args.method} gender {gender:+.2f}; "
                  f"white draws vs {args.method} race {race:+.2f}")


if __name__ == "__main__":
    main()
