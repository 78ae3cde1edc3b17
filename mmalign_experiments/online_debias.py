"""Demonstration 3 of issue #16: online mDPO rounds vs the offline default debiasing run, with the same number of
generated images, on the shipped 32×32 face model (docs/online-demos.md §3).

- **offline** (one cell per seed): ``mmalign_experiments.debias`` with the default settings and the mDPO method
  alone: chosen groups of attribute-prompted images filtered by the face classifier vs the model's own images of the
  plain prompt, ``training.max_steps`` steps, evaluated at its end.
- **online** (one cell per seed): ``mmalign.image.online`` rounds on the same training occupations' plain prompts:
  each round generates ``k`` images per prompt with the current policy, scores them with the face classifiers'
  balance reward (gender balance + race balance of the prompt's k images, :class:`~mmalign.rewards.image.
  ClassifierReward`), takes the top half as chosen and the bottom half as rejected, trains mDPO for
  ``steps_per_round`` steps (the offline run's model, full fine-tuning, β_d, learning rate and batch), and is
  evaluated after every round. ``rounds × steps_per_round`` = the offline run's steps; ``rounds × k × training
  occupations`` ≈ the number of images the offline run generated (its candidates + rejected images, counted).
- **evaluation** (both, and the base model as round 0): the debias experiment's own held-out measurement, unchanged:
  the held-out occupations' plain prompts × ``images_per_occupation`` images at fixed seeds, Simpson index of gender
  and race over the requested groups (SPEC §6), no-face rate, denoising loss on real FairFace faces.

Seeds (the unit): seed s draws everything anew on both sides — offline: ``groups.seed = 200000·s`` (its training
images) and ``training.seed = s``; online: generation seed ``1000000·(s+1)`` and ``training.seed = s``. The held-out
occupations and evaluation seeds are the same for every seed and method (paired comparison).

Scale (``--occupations 25 --images-per-occupation 20 --quality-images 64``, the defaults here): half the debias
default's occupations (20 trained on, 5 held out), 20 held-out images per occupation, 64 real faces for the
denoising loss, so that three seeds fit the shared 2 CPUs (docs/online-demos.md §3 gives the measured cost behind
it); ``--occupations 50 --images-per-occupation 24 --quality-images 256`` is the debias default's scale.

Analysis rule (fixed before any run): for each attribute (Simpson gender, Simpson race) and seed, d_s = online
after its last round − offline at its end. **Online beats offline** on an attribute iff mean d > 0 and d_s > 0 in
every seed; **offline beats online** iff mean d < 0 and d_s < 0 in every seed; otherwise the comparison is not
resolved at this number of seeds. Both are also compared with the base model the same way. The no-face rate and the
denoising-loss change are reported beside; a "win" whose model lost more faces (no-face rate above 0.05) is named
as such. Every number is reported whatever its direction.

    python -m mmalign_experiments.online_debias --seeds 0 1 2 --jobs 2 \\
        --out bench/results/online_debias_results.json --plot bench/results/online_debias.png

Every finished cell (``<work>/<kind>-seed<s>/cell.json``, with the settings it ran under) is reused by a re-run with
the same settings, and an interrupted online cell resumes from its last finished round (the library's exact resume),
so the work can be spread over several calls.

``--reference previous`` trains each online round against the policy the previous round left instead of the
starting model (cells ``online-reference-previous-seed<s>``); ``--compare-with <results JSON>`` takes that file's
online (``reference: initial``) and offline cells of the same settings as finished and compares paired per seed
(:mod:`mmalign_experiments.online_debias_reference` holds that comparison and its rule).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from mmalign_experiments import online_debias_reference
from mmalign_experiments.online_debias_reference import ATTRIBUTES
from mmalign_experiments.sweep import same_sign_verdict

REPORTED = ATTRIBUTES + ("gender_gap", "race_gap", "no_face_rate", "denoising_loss")


def settings(args) -> dict[str, Any]:
    """What a cell's result depends on (a cached cell is reused only under the same settings). The reference is
    named only when it is not the default, so cells and result files stored before the option keep their settings."""
    out = {"rounds": args.rounds, "k": args.k, "steps_per_round": args.steps_per_round,
           "occupations": args.occupations, "images_per_occupation": args.images_per_occupation,
           "quality_images": args.quality_images, "set": list(args.set)}
    if reference(args) != "initial":
        out["reference"] = reference(args)
    return out


def reference(args) -> str:
    """The online rounds' reference: ``initial`` (the default) or ``previous``."""
    return getattr(args, "reference", "initial")


def cell_name(kind: str, seed: int, args) -> str:
    """The cell's folder: ``<kind>-seed<s>``; online cells under ``reference: previous`` get their own."""
    if kind == "online" and reference(args) != "initial":
        return f"online-reference-{reference(args)}-seed{seed}"
    return f"{kind}-seed{seed}"


def debias_config(args, seed: int, output_dir: Path):
    """The offline default's config (mdpo only) for ``seed``: both sides take model, occupations, sampling,
    classifier, training and evaluation from it."""
    from mmalign.config import load_config
    from mmalign_experiments.debias import DebiasConfig

    overrides = [f"output_dir={output_dir}", f"groups.seed={200000 * seed}", f"training.seed={seed}",
                 "training.num_threads=1", f"training.max_steps={args.rounds * args.steps_per_round}",
                 f"occupations.count={args.occupations}", f"evaluation.images_per_occupation={args.images_per_occupation}",
                 f"evaluation.quality_images={args.quality_images}",
                 "methods=[{name: mdpo, objective: mdpo, beta_d: 5000}]", *args.set]
    return load_config(DebiasConfig, {}, overrides)


def _numbers(summary: dict) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}


def offline_cell(args, seed: int, cell_dir: Path) -> dict[str, Any]:
    from mmalign_experiments.debias import run

    report = run(debias_config(args, seed, cell_dir))
    groups = report["groups"]
    generated = int(groups["candidates_classified"]) + groups_rejected(report)
    return {"base": _numbers(report["summary"]["base"]), "final": _numbers(report["summary"]["mdpo"]),
            "generated_images": generated, "groups": groups, "timings_s": report["timings_s"]}


def groups_rejected(report: dict) -> int:
    """Rejected images the offline run sampled: ``rejected_per_group`` for every planned group (dropped groups'
    images were sampled too)."""
    config = report["config"]["groups"]
    train = len(report["occupations"]["train"])
    return train * config["groups_per_occupation"] * config["rejected_per_group"]


def online_cell(args, seed: int, cell_dir: Path) -> dict[str, Any]:
    import torch

    import mmalign.image
    from mmalign.image.classifiers import load_classifier
    from mmalign.image.face_model.prompts import portrait_prompt
    from mmalign.rewards.base import WeightedSum
    from mmalign.rewards.image import ClassifierReward
    from mmalign_experiments.debias.images import ImageCache, default_cache_dir, model_fingerprint
    from mmalign_experiments.debias.occupations import select_occupations, split_occupations
    from mmalign_experiments.debias.pipeline import _Evaluator, _real_faces, resolve_model

    torch.set_num_threads(1)
    config = debias_config(args, seed, cell_dir)
    occupations = select_occupations(config.occupations.count, config.occupations.names, config.occupations.path)
    split = split_occupations(occupations, config.occupations.eval_fraction, config.occupations.seed)
    pretrained, conditioner, conditioner_kwargs = resolve_model(config)
    resolution = config.model.resolution or 32  # the shipped face model's side (the offline run reads the same)
    classifier = load_classifier(config.classifier.name, confidence_threshold=config.classifier.confidence_threshold,
                                 **config.classifier.kwargs)
    real_faces = _real_faces(config, split.eval) if config.evaluation.quality_images > 0 else None
    evaluator = _Evaluator(config, classifier, split.eval, resolution, real_faces)
    # round 0 is the base model: its held-out images are the offline run's, cached
    cache = ImageCache(config.cache_dir or default_cache_dir(), model_fingerprint(pretrained, None, None, conditioner),
                       config.sampling, resolution)
    calls = {"n": 0}

    def evaluate(model) -> dict[str, float]:
        calls["n"] += 1
        summary, _, _ = evaluator(model, cache=cache if calls["n"] == 1 and not _resumed(cell_dir) else None)
        return _numbers(summary)

    reward = WeightedSum([ClassifierReward(classifier, attribute="gender", mode="balance"),
                          ClassifierReward(classifier, attribute="race", mode="balance")])
    training = {**asdict(config.training), "max_steps": args.steps_per_round, "save_steps": 5, "plot": False,
                "resume_from_checkpoint": "latest" if _resumed(cell_dir) else None, "progress_bar": False}
    online_config = {
        "prompts": [portrait_prompt(o.name) for o in split.train],
        "model": {"name_or_path": pretrained, "text_conditioner": conditioner,
                  "text_conditioner_kwargs": conditioner_kwargs, "dtype": config.model.dtype},
        "lora": asdict(config.lora), "rounds": args.rounds, "k": args.k, "resolution": resolution,
        "num_inference_steps": config.sampling.num_inference_steps, "guidance_scale": config.sampling.guidance_scale,
        "scheduler": config.sampling.scheduler, "seed": 1_000_000 * (seed + 1),
        "objective": {"name": "mdpo", "beta_d": 5000.0}, "training": training, "output_dir": str(cell_dir / "rounds"),
        "reference": reference(args),
    }
    result = mmalign.image.online(online_config, reward=reward, evaluate=evaluate)
    rows = result["rounds"]
    return {"rounds": rows, "base": {k: v for k, v in rows[0].items() if k != "round"},
            "final": {k: v for k, v in rows[-1].items() if k != "round"},
            "generated_images": args.rounds * args.k * len(split.train)}


def _resumed(cell_dir: Path) -> bool:
    return (cell_dir / "rounds" / "rounds.jsonl").is_file()


def cell(job: tuple) -> Optional[dict[str, Any]]:
    """One (kind, seed) cell: reused when ``cell.json`` holds the same settings, else run and written (with
    ``--finished-only``: None instead of running)."""
    kind, seed, work, args = job
    cell_dir = Path(work) / cell_name(kind, seed, args)
    done = cell_dir / "cell.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("settings") == settings(args):
            return cached
    if getattr(args, "finished_only", False):
        return None
    if kind == "offline" and cell_dir.exists():  # an interrupted offline run starts again (its images are cached)
        import shutil

        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = (online_cell if kind == "online" else offline_cell)(args, seed, cell_dir)
    result.update(kind=kind, seed=seed, settings=settings(args), wall_s=round(time.time() - started, 1))
    from mmalign.io import atomic_write_text

    atomic_write_text(done, json.dumps(result, indent=1))
    return result


def compare(online: Sequence[dict], offline: Sequence[dict]) -> dict[str, Any]:
    """The fixed rule: per attribute, paired per seed, online − offline (and each − base)."""
    by_seed = {c["seed"]: c for c in offline}
    out: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        pairs = [(c["seed"], c["final"][attribute], by_seed[c["seed"]]["final"][attribute])
                 for c in online if c["seed"] in by_seed]
        d = [on - off for _, on, off in pairs]
        entry: dict[str, Any] = {"seeds": [s for s, _, _ in pairs], "online_minus_offline": d}
        if d:
            mean = statistics.mean(d)
            entry["mean"] = mean
            entry["sd"] = statistics.stdev(d) if len(d) > 1 else None
            entry["verdict"] = same_sign_verdict(d, "online beats offline", "offline beats online")
        for name, cells in (("online", online), ("offline", offline)):
            gains = [c["final"][attribute] - c["base"][attribute] for c in cells]
            entry[f"{name}_minus_base"] = gains
            if gains:
                entry[f"{name}_vs_base"] = same_sign_verdict(gains, "above base", "below base")
        out[attribute] = entry
    return out


def mean_sd(values: Sequence[float]) -> dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "values": list(values)}


def summarise(online: Sequence[dict], offline: Sequence[dict]) -> dict[str, Any]:
    rounds = max((len(c["rounds"]) for c in online), default=0)
    per_round = [{key: mean_sd([c["rounds"][r].get(key) for c in online if len(c["rounds"]) > r])
                  for key in REPORTED} for r in range(rounds)]
    return {"online_per_round": per_round,
            "offline_final": {key: mean_sd([c["final"].get(key) for c in offline]) for key in REPORTED},
            "base": {key: mean_sd([c["base"].get(key) for c in offline or online]) for key in REPORTED},
            "generated_images": {"online": [c["generated_images"] for c in online],
                                 "offline": [c["generated_images"] for c in offline]},
            "comparison": compare(online, offline)}


def markdown(summary: dict) -> str:
    """Per round (online) and at the end (offline): mean ± sd over seeds, the seeds' values in brackets."""
    def fmt(entry: dict, digits: int = 3) -> str:
        if entry["mean"] is None:
            return "—"
        sd = f" ± {entry['sd']:.{digits}f}" if entry["sd"] is not None else ""
        values = ", ".join(f"{v:.{digits}f}" for v in entry["values"])
        return f"{entry['mean']:.{digits}f}{sd} ({values})"

    keys = ("simpson_gender", "simpson_race", "no_face_rate", "denoising_loss")
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r, row in enumerate(summary["online_per_round"]):
        label = "base (round 0)" if r == 0 else f"online, after round {r}"
        lines.append(f"| {label} | " + " | ".join(fmt(row[k], 4 if k == "denoising_loss" else 3) for k in keys) + " |")
    off = summary["offline_final"]
    lines.append("| offline, at its end | " + " | ".join(fmt(off[k], 4 if k == "denoising_loss" else 3) for k in keys)
                 + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ATTRIBUTES):
        rows = summary["online_per_round"]
        x = list(range(len(rows)))
        means = [r[key]["mean"] for r in rows]
        sds = [r[key]["sd"] or 0.0 for r in rows]
        ax.errorbar(x, means, yerr=sds, fmt="o-", capsize=3, label="online mDPO (mean ± sd over seeds)")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r[key]["values"]), r[key]["values"], ".", color="C0", alpha=0.35)
        off = summary["offline_final"][key]
        if off["mean"] is not None:
            last = max(x) if x else 1
            ax.errorbar([last + 0.1], [off["mean"]], yerr=[off["sd"] or 0.0], fmt="s", color="C3", capsize=3,
                        label="offline mDPO at its end (same images, steps)")
            ax.plot([last + 0.1] * len(off["values"]), off["values"], ".", color="C3", alpha=0.35)
        ax.set_title(key.replace("_", " ") + " (held-out occupations)")
        ax.set_xlabel("round (0 = base model)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from mmalign.engine.plots import save_figure

    return save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmalign_experiments.online_debias", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4, help="online rounds")
    parser.add_argument("--k", type=int, default=4, help="images per training prompt per round")
    parser.add_argument("--steps-per-round", type=int, default=10, help="mDPO steps per round (offline: rounds × this)")
    # the scale that fits the shared 2 CPUs (docs/online-demos.md §3); the debias default is 50 / 24 / 256
    parser.add_argument("--occupations", type=int, default=25, help="occupations (80%% trained on, 20%% held out)")
    parser.add_argument("--images-per-occupation", type=int, default=20, help="held-out images per occupation")
    parser.add_argument("--quality-images", type=int, default=64, help="real faces for the denoising loss (0 = off)")
    parser.add_argument("--kinds", nargs="+", default=["online", "offline"], choices=["online", "offline"])
    parser.add_argument("--set", action="append", default=[], help="debias config override key=value (both sides)")
    parser.add_argument("--reference", default="initial", choices=["initial", "previous"],
                        help="online rounds' reference: the starting model, or the previous round's policy")
    parser.add_argument("--compare-with", default=None,
                        help="a stored results JSON of the same settings (reference initial): its online and offline "
                             "cells are taken as finished and compared paired per seed with this run's")
    parser.add_argument("--jobs", type=int, default=1, help="cells in parallel processes (one thread each)")
    parser.add_argument("--finished-only", action="store_true", help="summarise the finished cells; run nothing")
    parser.add_argument("--work", default="outputs/online-debias", help="cell folders")
    parser.add_argument("--out", default="bench/results/online_debias_results.json")
    parser.add_argument("--plot", default="bench/results/online_debias.png")
    args = parser.parse_args(argv)
    if args.compare_with and args.reference == "initial":
        parser.error("--compare-with pairs a reference: previous run with a stored reference: initial run; "
                     "give --reference previous")
    stored_initial: list[dict] = []
    stored_offline: list[dict] = []
    if args.compare_with:  # checked before any cell runs

        expected = {k: v for k, v in settings(args).items() if k != "reference"}
        stored_initial, stored_offline = online_debias_reference.stored_cells(Path(args.compare_with), expected)
        stored_initial = [c for c in stored_initial if c["seed"] in args.seeds]
    jobs = [(kind, seed, args.work, args) for seed in args.seeds for kind in args.kinds]  # whole seeds first
    if args.jobs > 1:  # separate processes, one thread each (spawned: no forked torch state)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            cells = list(pool.map(cell, jobs))
    else:
        cells = [cell(job) for job in jobs]
    cells = [c for c in cells if c is not None]
    online = [c for c in cells if c["kind"] == "online"]
    offline = [c for c in cells if c["kind"] == "offline"]
    ran = {c["seed"] for c in offline}
    offline += [c for c in stored_offline if c["seed"] in args.seeds and c["seed"] not in ran]
    summary = {"settings": settings(args), "seeds": args.seeds, **summarise(online, offline),
               "cells": [{k: v for k, v in c.items() if k not in ("settings",)} for c in cells]}
    if args.compare_with:
        summary["compared_with"] = args.compare_with
        summary["reference_comparison"] = online_debias_reference.report(
            online, stored_initial, offline, Path(args.plot) if online else None)
        print(summary["reference_comparison"]["table"])
        print(json.dumps(summary["reference_comparison"]["previous_vs_initial"], indent=1))
    elif online:
        summary["plot"] = str(plot(summary, Path(args.plot)))
    from mmalign.io import atomic_write_text

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(summary, indent=1))
    if online:
        print(markdown(summary))
    for attribute, entry in summary["comparison"].items():
        print(attribute, {k: entry.get(k) for k in ("online_minus_offline", "mean", "verdict")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
