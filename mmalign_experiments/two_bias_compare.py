"""Two biases at once: DPO vs single-trigger CNRPO for each bias vs two-trigger CNRPO, over seeds (cnrpo Eq. 14
with Σα, its Table 3 setting; SPEC §4; issue #17).

Per seed, on the data of :mod:`mmalign_experiments.two_bias_data` (a main set where a share of the pairs prefers a
long padded answer and a share prefers an answer opening with the sycophantic prefix; one auxiliary set per bias;
clean anchor pairs; held-out probes), with the same LoRA settings, steps and seed for every method:

- **DPO** on the main set;
- **CNRPO length**: one trigger ``<BeLongerNow>`` on the length auxiliary set;
- **CNRPO prefix**: one trigger ``<BeAgreeableNow>`` on the prefix auxiliary set;
- **CNRPO both**: both triggers, both auxiliary sets (Eq. 14 with Σα).

γ + Σα = β is kept in every CNRPO run: β and γ are given, and the remainder ``β − γ`` is split equally over the
triggers of the run (one trigger: α = β − γ; two: α_i = (β − γ)/2), so no run carries the extra ``(γ + Σα − β)
h_ref`` term (docs/bias-robust-two-triggers.md). Measured per method and seed: the probes' mean log-likelihood
margin shift from the SFT model (``length``: long ≻ short, same correct answer; ``prefix``: with ≻ without the
prefix; ``target``: correct ≻ wrong), which shows each bias separately; and for the CNRPO runs the stage-1
trigger report (length in tokens / prefix share, with and without each trigger).

    python -m mmalign_experiments.two_bias_compare          # docs/bias-robust-two-triggers.md (budget there)
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmalign.cli import run_command
from mmalign.config import to_dict
from mmalign.io import atomic_write_text, write_jsonl
from mmalign_experiments.sweep import mark_reused, open_sweep, stored_rows
from mmalign_experiments.two_bias_data import TRIGGERS, length_aux_pairs, prefix_aux_pairs, probe_pairs, two_bias_pairs

logger = logging.getLogger("mmalign_experiments.two_bias_compare")

PROBES = ("length", "prefix", "target")
# method -> the indices of TRIGGERS / auxiliary sets it uses (none: DPO)
METHODS: dict[str, tuple[int, ...]] = {"DPO": (), "CNRPO length": (0,), "CNRPO prefix": (1,), "CNRPO both": (0, 1)}


@dataclass
class TwoBiasCompareConfig:
    """DPO / single-trigger CNRPO per bias / two-trigger CNRPO on a main set with two biases."""

    model: str = field(default="smollm2", metadata={"help": "causal LM folder, or 'smollm2' (converted offline)"})
    main_size: int = field(default=32, metadata={"help": "main-set pairs"})
    eps_length: float = field(default=0.25, metadata={"help": "share of main pairs with the length bias"})
    eps_prefix: float = field(default=0.25, metadata={"help": "share of main pairs with the prefix bias"})
    aux_size: int = field(default=16, metadata={"help": "pairs per auxiliary set"})
    aux_share: float = field(default=1.0, metadata={"help": "bias share of each auxiliary set"})
    anchor_size: int = field(default=16, metadata={"help": "clean untriggered pairs in stage 1 (0 = none)"})
    probe_size: int = field(default=16, metadata={"help": "pairs per probe"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "the unit of replication"})
    beta: float = field(default=0.5, metadata={"help": "β of DPO and CNRPO (paper: 0.5)"})
    gamma: float = field(default=0.2, metadata={"help": "CNRPO γ (paper: 0.2); Σα = β − γ"})
    learning_rate: float = field(default=2e-4, metadata={"help": "DPO and CNRPO stage 2"})
    bias_learning_rate: float = field(default=5e-4, metadata={"help": "CNRPO stage 1"})
    epochs: float = field(default=1.0, metadata={"help": "epochs of DPO / stage 2"})
    bias_epochs: float = field(default=1.0, metadata={"help": "epochs of stage 1"})
    batch_size: int = field(default=4, metadata={"help": "pairs per step"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2r, all linear layers)"})
    max_response_length: int = field(default=128, metadata={"help": "response tokens kept"})
    report_prompts: int = field(default=8, metadata={"help": "trigger report: prompts (greedy)"})
    report_max_new_tokens: int = field(default=96, metadata={"help": "trigger report: tokens per answer"})
    num_threads: int = field(default=1, metadata={"help": "torch threads"})
    output_dir: str = field(default="outputs/two-bias-compare", metadata={"help": "run folder (finished runs reused)"})
    only_finished: bool = field(default=False, metadata={"help": "only tabulate the seeds already finished"})
    reuse_results: Optional[str] = field(default=None, metadata={
        "help": "an earlier results.json with the same settings (e.g. docs/bias-robust-two-triggers-results.json): "
                "its seeds count as finished (written as seed*/results.json where none exists)"})

    def __post_init__(self) -> None:
        if not 0 < self.gamma < self.beta:
            raise ValueError(f"gamma: need 0 < gamma < beta so that Σα = beta − gamma > 0; got {self.gamma}, {self.beta}")
        if min(self.main_size, self.aux_size, self.probe_size, self.report_prompts) < 1 or self.anchor_size < 0:
            raise ValueError("main_size, aux_size, probe_size, report_prompts must be >= 1 and anchor_size >= 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need distinct seeds, got {self.seeds}")


def alphas(cfg: TwoBiasCompareConfig, triggers: tuple[int, ...]) -> list[float]:
    """α per trigger of a run: β − γ split equally, so γ + Σα = β."""
    return [(cfg.beta - cfg.gamma) / len(triggers)] * len(triggers)


def make_data(cfg: TwoBiasCompareConfig, seed: int, out: Path) -> dict[str, str]:
    clean = length_aux_pairs(cfg.anchor_size, bias_share=0.0, seed=seed + 400) if cfg.anchor_size else []
    rows = {"main": two_bias_pairs(cfg.main_size, eps_length=cfg.eps_length, eps_prefix=cfg.eps_prefix, seed=seed),
            "aux-length": length_aux_pairs(cfg.aux_size, bias_share=cfg.aux_share, seed=seed + 100),
            "aux-prefix": prefix_aux_pairs(cfg.aux_size, bias_share=cfg.aux_share, seed=seed + 200),
            "anchor": clean,
            **{f"probe-{k}": v for k, v in probe_pairs(cfg.probe_size, seed=seed + 300).items()}}
    return {name: str(write_jsonl(out / "data" / f"{name}.jsonl", r)) for name, r in rows.items() if r}


def _sections(cfg: TwoBiasCompareConfig, model_path: str, seed: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": model_path},
        "lora": {"enabled": True, "r": cfg.lora_r, "alpha": 2 * cfg.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "reference": {"mode": "adapter"},
        "training": {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "lr_scheduler": "constant",
                     "logging_steps": 1, "num_threads": cfg.num_threads, "seed": seed, "num_epochs": cfg.epochs,
                     "max_response_length": cfg.max_response_length, "progress_bar": False},
    }


def _run_method(cfg: TwoBiasCompareConfig, method: str, files: dict[str, str], model_path: str, seed: int,
                run_dir: Path) -> tuple[Path, Optional[list[dict[str, Any]]]]:
    """(final adapter folder, trigger report rows or None) of one method, reusing a finished run."""
    triggers = METHODS[method]
    final = run_dir / ("final" if not triggers else "main/final")
    report_file = run_dir / "bias" / "trigger_report.json"
    if not (final / "adapter_config.json").is_file():
        if not triggers:
            from mmalign.text.recipes.preference import train

            train({**_sections(cfg, model_path, seed), "data": {"train": files["main"], "use_chat_template": True},
                   "objective": {"name": "dpo", "beta": cfg.beta}, "output_dir": str(run_dir)})
        else:
            from mmalign_experiments.cnrpo_report import run_with_report

            aux = [files["aux-length"], files["aux-prefix"]]
            run_with_report({
                **_sections(cfg, model_path, seed), "data": {"train": files["main"], "use_chat_template": True},
                "cnrpo": {"triggers": [TRIGGERS[i] for i in triggers], "auxiliary_data": [aux[i] for i in triggers],
                          "alphas": alphas(cfg, triggers), "beta": cfg.beta, "gamma": cfg.gamma,
                          "bias_epochs": cfg.bias_epochs, "main_epochs": cfg.epochs,
                          "bias_learning_rate": cfg.bias_learning_rate,
                          "anchor_data": [files["anchor"]] if "anchor" in files else []},
                "trigger_report": {"prompts": files["probe-target"], "num_prompts": cfg.report_prompts,
                                   "max_new_tokens": cfg.report_max_new_tokens, "temperature": 0.0,
                                   "aspects": [("length", "prefix")[i] for i in triggers]},
                "output_dir": str(run_dir)})
    rows = json.loads(report_file.read_text())["rows"] if triggers else None
    return final, rows


def _run_seed(cfg: TwoBiasCompareConfig, seed: int, model_path: str) -> list[dict[str, Any]]:
    from mmalign.text.evaluation.metrics import margin_shifts

    out = Path(cfg.output_dir) / f"seed{seed}"
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    files = make_data(cfg, seed, out)
    finals, reports, walls = {}, {}, {}
    for method in METHODS:
        tick = time.perf_counter()
        finals[method], reports[method] = _run_method(cfg, method, files, model_path, seed,
                                                      out / method.replace(" ", "-").lower())
        walls[method] = time.perf_counter() - tick
    probes = {p: margin_shifts({m: str(f) for m, f in finals.items()}, model_path, files[f"probe-{p}"]) for p in PROBES}
    rows = [{"seed": seed, "method": m, **{f"{p}_shift": probes[p][m]["shift_from_sft"] for p in PROBES},
             **{f"{p}_shift_se": probes[p][m]["shift_stderr"] for p in PROBES},
             "trigger_report": reports[m], "alphas": alphas(cfg, METHODS[m]) if METHODS[m] else None,
             "wall_s": walls[m]} for m in METHODS]
    atomic_write_text(done, json.dumps(rows, indent=1))
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    def cell(method: str, key: str) -> str:
        values = [r[key] for r in rows if r["method"] == method]
        return f"{statistics.mean(values):+.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    lines = ["Probe margin shift from SFT (nats; mean ± s.d. over seeds; length/prefix: lower = less bias, "
             "target: higher = better):", "", "| method | α per trigger | length ≻ short | prefix ≻ none | correct ≻ wrong |",
             "|---|---|---|---|---|"]
    for m in METHODS:
        a = next((r["alphas"] for r in rows if r["method"] == m), None)
        lines.append(f"| {m} | {', '.join(f'{x:g}' for x in a) if a else '–'} | " +
                     " | ".join(cell(m, f"{p}_shift") for p in PROBES) + " |")
    lines += ["", "Per seed (shift ± its standard error over the probe pairs):", "",
              "| method | seed | length ≻ short | prefix ≻ none | correct ≻ wrong |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | " + " | ".join(f"{r[f'{p}_shift']:+.2f} ± {r[f'{p}_shift_se']:.2f}"
                                                          for p in PROBES) + " |"
              for m in METHODS for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])]
    lines += ["", "Trigger report after stage 1 (greedy; per seed: mean without → with the trigger (share higher with it)):", "",
              "| method | trigger | aspect | " + " | ".join(f"seed {s}" for s in sorted({r['seed'] for r in rows})) + " |",
              "|---|---|---|" + "---|" * len({r["seed"] for r in rows})]
    for m in (m for m in METHODS if METHODS[m]):
        per_seed = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        for i, rep in enumerate(per_seed[0]["trigger_report"] if per_seed else []):
            cells = [f"{t['mean_without']:.2f} → {t['mean_with']:.2f} ({t['share_higher_with_trigger']:.2f})"
                     for t in (r["trigger_report"][i] for r in per_seed)]
            lines.append(f"| {m} | `{rep['trigger']}` | {rep['aspect']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The analysis rule, fixed before the three-seed runs (docs/bias-robust-two-triggers.md). Bias rows hold in a seed
# when the first method's probe shift is below the second's; the target row when the first's target shift is not
# below the second's by more than twice the first's standard error.
RULE = (("R1", "CNRPO both", "DPO", "length"), ("R1", "CNRPO both", "DPO", "prefix"),
        ("R2", "CNRPO both", "CNRPO prefix", "length"), ("R2", "CNRPO both", "CNRPO length", "prefix"),
        ("R3", "CNRPO both", "DPO", "target"))
# reported beside the rule, not tested: each single trigger on its own bias, and two triggers against it
REPORTED = (("–", "CNRPO length", "DPO", "length"), ("–", "CNRPO prefix", "DPO", "prefix"),
            ("–", "CNRPO both", "CNRPO length", "length"), ("–", "CNRPO both", "CNRPO prefix", "prefix"))


def _holds(a: dict[str, Any], b: dict[str, Any], probe: str) -> bool:
    if probe == "target":
        return a["target_shift"] >= b["target_shift"] - 2 * a["target_shift_se"]
    return a[f"{probe}_shift"] < b[f"{probe}_shift"]


def rule_table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(markdown table of every rule / reported comparison paired by seed, the rule's verdict)."""
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| rule | comparison | probe | seeds where it holds | mean difference (nats) |", "|---|---|---|---|---|"]
    held: dict[tuple[str, str], bool] = {}
    for part, a, b, probe in RULE + REPORTED:
        paired = [(by[a, s], by[b, s]) for s in seeds if (a, s) in by and (b, s) in by]
        n_ok = sum(_holds(x, y, probe) for x, y in paired)
        diff = statistics.mean(x[f"{probe}_shift"] - y[f"{probe}_shift"] for x, y in paired) if paired else float("nan")
        what = "first ≥ second − 2 s.e." if probe == "target" else "first lower"
        lines.append(f"| {part} | {a} vs {b} | {probe} ({what}) | {n_ok}/{len(paired)} | {diff:+.2f} |")
        if part != "–":
            held[part, probe] = bool(paired) and n_ok == len(paired) == len(seeds)
    r1 = [held["R1", "length"], held["R1", "prefix"]]
    if all(held.values()):
        verdict = "supported"
    elif any(r1):
        verdict = "partly supported"
    else:
        verdict = "not supported"
    return "\n".join(lines) + "\n", verdict


# what may differ between a stored sweep and this one: the grid of seeds and the bookkeeping
REUSE_IGNORE = ("seeds", "output_dir", "only_finished", "reuse_results")


def reuse_stored_seeds(cfg: TwoBiasCompareConfig, out: Path) -> list[int]:
    """Writes each configured seed's rows of ``cfg.reuse_results`` (all four methods) as that seed's finished
    ``results.json``, unless the seed has one; returns the seeds written."""
    rows = stored_rows(cfg.reuse_results, cfg, REUSE_IGNORE)
    written = []
    for seed in cfg.seeds:
        mine = [r for r in rows if r["seed"] == seed]
        done = out / f"seed{seed}" / "results.json"
        if sorted(r["method"] for r in mine) == sorted(METHODS) and not done.is_file():
            mark_reused(done, mine, cfg.reuse_results)
            written.append(seed)
    logger.info("reused seeds %s from %s", written, cfg.reuse_results)
    return written


def run_compare(config: TwoBiasCompareConfig | dict | str | Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Every seed x method; writes ``results.json`` and ``results.md`` to ``output_dir``."""
    from mmalign.engine.threads import torch_threads

    started = time.perf_counter()
    cfg, out, model_path = open_sweep(TwoBiasCompareConfig, config, overrides)
    if cfg.reuse_results:
        reuse_stored_seeds(cfg, out)
    rows: list[dict[str, Any]] = []
    with torch_threads(cfg.num_threads):
        for seed in cfg.seeds:
            done = out / f"seed{seed}" / "results.json"
            if cfg.only_finished and not done.is_file():
                logger.info("seed %d has not finished: left out of the table", seed)
                continue
            rows += _run_seed(cfg, seed, model_path)
    if not rows:
        raise ValueError(f"no finished seed of {cfg.seeds} in {out}")
    finished = sorted({r["seed"] for r in rows})
    rules, verdict = rule_table(rows)
    table = (summary_table(rows) + f"\nThe analysis rule paired by seed (finished seeds {finished}; "
             f"docs/bias-robust-two-triggers.md):\n\n{rules}\nVerdict by the rule: **{verdict}**.\n")
    results = {"rows": rows, "config": to_dict(cfg), "verdict": verdict,
               "total_s": time.perf_counter() - started}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", f"# Two biases: DPO vs CNRPO (one / two triggers)\n\nSeeds {finished} of {cfg.seeds}; "
                      f"{cfg.main_size} main pairs, {cfg.aux_size} per auxiliary set, {cfg.anchor_size} anchors, "
                      f"{cfg.probe_size} pairs per probe; β {cfg.beta}, γ {cfg.gamma}, γ + Σα = β.\n\n{table}")
    print(table, end="")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(prog="python -m mmalign_experiments.two_bias_compare", config_cls=TwoBiasCompareConfig,
                       run=lambda cfg, args: run_compare(cfg) and 0, argv=argv,
                       description="cnrpo Table 3 setting: DPO, single-trigger CNRPO per bias and two-trigger CNRPO "
                       "on a main set with a length and a sycophantic-prefix bias; probes and trigger reports.")


if __name__ == "__main__":
    raise SystemExit(main())
