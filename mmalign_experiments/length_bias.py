"""Length-bias comparison on SmolLM2-135M-Instruct + LoRA: DPO, IPO, rDPO, cDPO and CNRPO (SPEC §4, cnrpo §6.2).

    python -m mmalign_experiments.length_bias                      # everything, from scratch (CPU: about an hour)
    python -m mmalign_experiments.length_bias --resume             # skip runs whose final/ already exists
    python -m mmalign_experiments.length_bias --eps 0.2 --methods dpo cnrpo --main-size 16   # a smaller version

What it does (all under ``--out``, default ``outputs/length-bias-exp``; nothing is downloaded):

1. Data (:mod:`mmalign_experiments.bias_data`): for every noise level ε a main set of ``--main-size`` arithmetic pairs
   where the true preference is the correct short answer and a share ε of pairs prefers a long padded response
   instead (correct half of the time); one auxiliary set (``--aux-size`` pairs, ``--aux-bias-share`` of them
   length-biased, default 50 %) for CNRPO's
   stage 1; ``--num-questions`` held-out questions (prompts absent from every training set).
2. CNRPO stage 1 once (bias learning behind ``<BeLongerNow>`` on the auxiliary set; it does not depend on ε) and
   its trigger report (greedy answer lengths on held-out questions with and without the trigger).
3. For every ε: DPO, IPO, rDPO, cDPO (the text trainer) and CNRPO stage 2 (continuing the shared stage-1 adapter),
   all LoRA on the same base, the same main set, batch size, learning rate, epochs and seed; the SFT reference's
   log-probabilities are precomputed once (``reference.mode: precomputed``; the same numbers as the
   adapter-disabled base).
4. Greedy answers of every model to the held-out questions (:func:`mmalign.text.evaluation.evaluate.evaluate_length_bias`):
   average answer length in tokens, longer-length ratio against the SFT model, target accuracy (the answer's
   numbers are exactly the correct one) and final-answer accuracy (the last number in the answer is the correct
   one); then every model's log-likelihood margin on held-out probe pairs and its shift from the SFT model's
   (:func:`mmalign.text.evaluation.evaluate.margin_shifts`): the correct answer padded long over the same answer short (the
   learned length preference, no decoding noise) and the correct short answer over a wrong one.

Ablations (``--methods``): ``cnrpo_dpo`` and ``cnrpo_dpo_gamma`` run stage 2 with α = 0 from the same stage-1
adapter, at CNRPO's β or at β = γ (then only the bias-aversion term separates it from CNRPO). The setting measured
to work (docs/bias-robust.md): ``--aux-bias-share 1.0 --anchors 32 --alpha 0.3`` (γ + α = β).

Writes ``results.json`` (every metric, hyperparameter, wall time and the trigger report), ``answers.jsonl``
(every greedy answer) and ``results.md`` (the tables). Run with one torch thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmalign.io import atomic_write_text, write_jsonl  # noqa: E402
from mmalign_experiments.bias_data import length_auxiliary_pairs, length_bias_pairs, length_probe_pairs  # noqa: E402

logger = logging.getLogger("length_bias_experiment")

TRIGGER = "<BeLongerNow>"
METHOD_LABELS = {"dpo": "DPO", "ipo": "IPO", "rdpo": "rDPO", "cdpo": "cDPO", "cnrpo": "CNRPO",
                 # ablations from the same stage-1 adapter as CNRPO: stage 2 with α = 0 and γ = β (= DPO), at
                 # CNRPO's β, or at β = CNRPO's γ (the policy's own weight in Eq. 14: only the bias term differs)
                 "cnrpo_dpo": "DPO from the stage-1 model",
                 "cnrpo_dpo_gamma": "DPO (β = γ) from the stage-1 model"}
CNRPO_METHODS = ("cnrpo", "cnrpo_dpo", "cnrpo_dpo_gamma")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmalign_experiments.length_bias", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="~/.cache/mmalign/smollm2-135m-instruct",
                   help="SFT model folder (python -m mmalign.text.smollm writes the default)")
    p.add_argument("--out", default="outputs/length-bias-exp", help="output folder")
    p.add_argument("--eps", type=float, nargs="+", default=[0.2, 0.4], help="shares of length-biased main pairs")
    p.add_argument("--methods", nargs="+", default=["dpo", "cnrpo", "ipo", "rdpo", "cdpo"], choices=list(METHOD_LABELS))
    p.add_argument("--main-size", type=int, default=64, help="main pairs per noise level")
    p.add_argument("--aux-size", type=int, default=32, help="auxiliary pairs (CNRPO stage 1)")
    p.add_argument("--aux-bias-share", type=float, default=0.5,
                   help="share of auxiliary pairs preferring the long response (paper: 40-50 %%)")
    p.add_argument("--num-questions", type=int, default=40, help="held-out questions evaluated greedily")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap at evaluation")
    p.add_argument("--beta", type=float, default=0.5, help="β of every objective (paper: 0.5)")
    p.add_argument("--gamma", type=float, default=0.2, help="CNRPO γ (paper, length bias: 0.2)")
    p.add_argument("--alpha", type=float, default=0.45, help="CNRPO α (paper, length bias: 0.45)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="LoRA learning rate of the main runs")
    p.add_argument("--bias-learning-rate", type=float, default=5e-4, help="LoRA learning rate of CNRPO stage 1")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs over the main set (every method)")
    p.add_argument("--bias-epochs", type=float, default=2.0, help="CNRPO stage-1 epochs over the auxiliary set")
    p.add_argument("--anchors", type=int, default=0,
                   help="untriggered anchor pairs in CNRPO stage 1 (short correct answer over a long one: the mirror "
                        "of the bias, so that it is learned behind the trigger only); 0 = Eq. 7 as written")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--stage-one-only", action="store_true", help="stop after CNRPO stage 1 and its trigger report")
    p.add_argument("--resume", action="store_true", help="reuse runs whose final/ exists (and the data files)")
    return p


# ------------------------------------------------------------------------------------------------ data
def make_data(args, out: Path) -> dict[str, Any]:
    data = out / "data"
    files: dict[str, Any] = {"main": {}}
    seen: set[str] = set()
    for eps in args.eps:
        rows = length_bias_pairs(args.main_size, eps=eps, seed=args.seed)
        files["main"][eps] = str(write_jsonl(data / f"main-eps{eps}.jsonl", rows))
        seen.update(r["prompt"] for r in rows)
    aux = length_auxiliary_pairs(args.aux_size, bias_share=args.aux_bias_share, seed=args.seed + 100)
    files["aux"] = str(write_jsonl(data / "aux.jsonl", aux))
    seen.update(r["prompt"] for r in aux)
    if args.anchors:
        anchors = [dict(r, chosen=r["rejected"], rejected=r["chosen"], biased=0)
                   for r in length_bias_pairs(args.anchors, eps=1.0, seed=args.seed + 200) if r["prompt"] not in seen]
        files["anchors"] = str(write_jsonl(data / "anchors.jsonl", anchors))
        seen.update(r["prompt"] for r in anchors)
    questions, pool_seed = [], args.seed + 999
    while len(questions) < args.num_questions:  # held out: no prompt of any training set, no duplicates
        for row in length_bias_pairs(4 * args.num_questions, eps=0.0, seed=pool_seed):
            if row["prompt"] not in seen and len(questions) < args.num_questions:
                seen.add(row["prompt"])
                questions.append(row)  # a full clean pair: CNRPO's trigger report reads prompts from pair rows
        pool_seed += 1
    files["questions"] = str(write_jsonl(data / "questions.jsonl", questions))
    files["questions_rows"] = questions
    for probe, rows in length_probe_pairs(questions, seed=args.seed + 300).items():
        files[f"probe_{probe}"] = str(write_jsonl(data / f"probe-{probe}.jsonl", rows))
    return files


# ------------------------------------------------------------------------------------------------ runs
def common_sections(args) -> dict[str, Any]:
    return {
        "lora": {"enabled": True, "r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "reference": {"mode": "precomputed"},
        "training": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "lr_scheduler": "constant",
                     "num_epochs": args.epochs, "logging_steps": 1, "num_threads": args.threads, "seed": args.seed,
                     "max_response_length": 128, "progress_bar": False},
    }


def objective_of(method: str, args, eps: float) -> dict[str, Any]:
    hp: dict[str, Any] = {"beta": args.beta}
    if method in ("rdpo", "cdpo"):
        hp["eps"] = eps  # the known share of pairs whose label disagrees with the true preference
    return {"name": method, **hp}


def cnrpo_config(args, files, *, main_file: str, output_dir: Path, method: str = "cnrpo") -> dict[str, Any]:
    """``method`` "cnrpo_dpo" / "cnrpo_dpo_gamma": stage 2 with α = 0 and γ = β (DPO, SPEC §4) at β or at β = γ,
    continuing the stage-1 adapter (stage 1 always uses ``args.beta``; it is shared, run once)."""
    beta, alpha, gamma = {"cnrpo": (args.beta, args.alpha, args.gamma), "cnrpo_dpo": (args.beta, 0.0, args.beta),
                          "cnrpo_dpo_gamma": (args.gamma, 0.0, args.gamma)}[method]
    return {
        "model": {"name_or_path": args.model},
        "data": {"train": main_file, "use_chat_template": True},
        "cnrpo": {"triggers": [TRIGGER], "auxiliary_data": [files["aux"]], "alphas": [alpha], "beta": beta,
                  "gamma": gamma, "bias_epochs": args.bias_epochs, "main_epochs": args.epochs,
                  "bias_learning_rate": args.bias_learning_rate,
                  "anchor_data": [files["anchors"]] if "anchors" in files else []},
        "trigger_report": {"prompts": files["questions"], "num_prompts": 16, "max_new_tokens": args.max_new_tokens,
                           "temperature": 0.0},
        **common_sections(args),
        "output_dir": str(output_dir),
    }


def timed(label: str, fn, timings: dict[str, float]):
    start = time.perf_counter()
    result = fn()
    timings[label] = round(time.perf_counter() - start, 1)
    logger.info("%s: %.1f s", label, timings[label])
    return result


def run_stage_one(args, files, out: Path, timings) -> Path:
    from mmalign_experiments.cnrpo_report import run_with_report

    stage_dir = out / "cnrpo-stage1"
    if not (args.resume and (stage_dir / "bias" / "final" / "adapter_config.json").exists()):
        first_main = files["main"][args.eps[0]]  # stage 1 reads only the auxiliary set; the main file is validated
        timed("cnrpo stage 1 + trigger report", lambda: run_with_report(
            cnrpo_config(args, files, main_file=first_main, output_dir=stage_dir), stage="bias"), timings)
    return stage_dir / "bias"


def run_method(method: str, eps: float, args, files, out: Path, stage_one: Path, timings) -> Path:
    run_dir = out / f"eps{eps}" / method
    final = run_dir / ("main/final" if method in CNRPO_METHODS else "final")
    if args.resume and (final / "adapter_config.json").exists():
        return final
    if method in CNRPO_METHODS:
        from mmalign_experiments.cnrpo_report import run_with_report as run_cnrpo

        run_dir.mkdir(parents=True, exist_ok=True)
        link = run_dir / "bias"  # stage 2 continues <output_dir>/bias/final: the shared stage-1 adapter
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(stage_one.resolve(), target_is_directory=True)
        timed(f"eps{eps} {METHOD_LABELS[method]} (stage 2)", lambda: run_cnrpo(
            cnrpo_config(args, files, main_file=files["main"][eps], output_dir=run_dir, method=method),
            stage="main"), timings)
    else:
        from mmalign.text.recipes.preference import train

        config = {"model": {"name_or_path": args.model},
                  "data": {"train": files["main"][eps], "use_chat_template": True},
                  "objective": objective_of(method, args, eps), **common_sections(args),
                  "output_dir": str(run_dir)}
        # one reference pass per noise level, shared by the four methods (cache keyed by data and weights)
        config["reference"]["cache_dir"] = str(out / f"eps{eps}" / "reference_cache")
        timed(f"eps{eps} {METHOD_LABELS[method]}", lambda: train(config), timings)
    return final


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Steps and the last logged training metrics of a run (its metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows:
        return {}
    last = train_rows[-1]
    return {"steps": last.get("step"), "last_loss": last.get("loss"),
            "last_margin": last.get("rewards/margins"), "last_accuracy": last.get("rewards/accuracies")}


# ------------------------------------------------------------------------------------------------ evaluation
def final_answer_accuracy(texts, answers) -> float:
    last = [re.findall(r"-?\d+", t) for t in texts]
    return sum(bool(n) and n[-1] == str(a) for n, a in zip(last, answers)) / len(texts)


def evaluate(models: dict[str, Path], args, files, timings, label: str) -> dict[str, dict[str, Any]]:
    from mmalign.text.evaluation.evaluate import evaluate_length_bias, margin_shifts

    questions = files["questions_rows"]
    table = timed(label, lambda: evaluate_length_bias(models, args.model, questions, use_chat_template=True,
                                                      max_new_tokens=args.max_new_tokens, seed=args.seed), timings)
    for row in table.values():
        row["final_answer_accuracy"] = final_answer_accuracy(row["answers"], [q["answer"] for q in questions])
    # the same models' log-likelihood margins on the held-out probe pairs (no decoding noise)
    for probe in ("length", "target"):
        shifts = timed(f"{label} ({probe} probe)", lambda: margin_shifts(
            models, args.model, files[f"probe_{probe}"], use_chat_template=True), timings)
        for name, row in shifts.items():
            table[name][f"{probe}_probe"] = row
    return table


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Measured {results['date']} on {results['machine']}; total wall time {results['total_wall_s'] / 60:.1f} min.", ""]
    tr = results.get("trigger_report")
    if tr:
        lines += ["Trigger report after CNRPO stage 1 (greedy, held-out questions):", "",
                  "| trigger | n | mean length without (tokens) | mean length with | share longer with trigger |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['trigger']}` | {r['n']} | {r['mean_without']:.1f} | {r['mean_with']:.1f} | "
                  f"{r['share_higher_with_trigger']:.2f} |" for r in tr["rows"]]
        lines.append("")
    n_q = results["settings"]["num_questions"]
    lines += [f"Held-out questions: {n_q}, greedy, at most {results['settings']['max_new_tokens']} new tokens.", "",
              "| ε | model | avg. answer length (tokens) | longer than SFT | target accuracy | final-answer accuracy | "
              "train steps | last train loss |", "|---|---|---|---|---|---|---|---|"]
    for key, block in results["evaluation"].items():
        for name, row in block.items():
            ts = (results["training"].get("stage 1", {}).get("CNRPO stage 1", {}) if name.startswith("CNRPO stage 1")
                  else results["training"].get(key, {}).get(name, {}))
            steps = ts.get("steps", "—")
            loss = f"{ts['last_loss']:.3f}" if ts.get("last_loss") is not None else "—"
            lines.append(f"| {key} | {name} | {row['avg_length_tokens']:.1f} | {row['longer_than_sft']:.2f} | "
                         f"{row['target_accuracy']:.2f} | {row['final_answer_accuracy']:.2f} | {steps} | {loss} |")
    probed = [(key, name, row) for key, block in results["evaluation"].items() for name, row in block.items()
              if "length_probe" in row]
    if probed:
        lines += ["", "Held-out probe pairs, one per question: summed log-likelihood margin (nats) of the correct "
                  "answer padded long over the same answer short (*length*: the learned length preference), and "
                  "of the correct short answer over a wrong one (*target*); shift = change from the SFT model on "
                  "the same pairs ± standard error.", "",
                  "| ε | model | length margin | length shift from SFT | target margin | target shift from SFT |",
                  "|---|---|---|---|---|---|"]
        for key, name, row in probed:
            cells = [f"{row[p]['mean_margin']:.1f} | {row[p]['shift_from_sft']:+.1f} ± {row[p]['shift_stderr']:.1f}"
                     for p in ("length_probe", "target_probe")]
            lines.append(f"| {key} | {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "Wall times (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items())]
    return "\n".join(lines) + "\n"


def save(results: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(out / "results.md", markdown(results))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    args.model = os.path.expanduser(args.model)
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: no such folder; run `python -m mmalign.text.smollm` first")
    if any(not 0 <= e < 0.5 for e in args.eps) and {"rdpo", "cdpo"} & set(args.methods):
        raise SystemExit(f"--eps {args.eps}: rDPO/cDPO need a noise rate in [0, 0.5)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    files = make_data(args, out)
    settings = {k: v for k, v in vars(args).items()}
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
                   f"load average at start {os.getloadavg()[0]:.1f}",
        "command": " ".join([sys.executable.split('/')[-1], *sys.argv]),
        "settings": settings, "timings_s": timings, "training": {}, "evaluation": {}, "total_wall_s": 0.0,
    }
    answers_rows = []

    stage_one = run_stage_one(args, files, out, timings) if set(CNRPO_METHODS) & set(args.methods) else None
    if stage_one is not None:
        report = stage_one / "trigger_report.json"
        if report.exists():
            results["trigger_report"] = {"rows": json.loads(report.read_text())["rows"]}
        results["training"]["stage 1"] = {"CNRPO stage 1": training_summary(stage_one)}
    if args.stage_one_only:
        results["total_wall_s"] = round(time.perf_counter() - start, 1)
        save(results, out)
        return 0

    for i, eps in enumerate(args.eps):
        key = f"ε={eps}"
        finals: dict[str, Path] = {}
        results["training"][key] = {}
        for method in args.methods:
            finals[METHOD_LABELS[method]] = run_method(method, eps, args, files, out, stage_one, timings)
            run_dir = finals[METHOD_LABELS[method]].parent
            results["training"][key][METHOD_LABELS[method]] = training_summary(run_dir)
            results["total_wall_s"] = round(time.perf_counter() - start, 1)
            save(results, out)
        models = dict(finals)
        if i == 0 and stage_one is not None:
            models["CNRPO stage 1 (no trigger)"] = stage_one / "final"
        table = evaluate(models, args, files, timings, f"eps{eps} evaluation")
        for name, row in table.items():
            answers_rows += [{"eps": eps, "model": name, "prompt": q["prompt"], "answer": q["answer"], "text": t}
                             for q, t in zip(files["questions_rows"], row.pop("answers"))]
        results["evaluation"][key] = table
        results["total_wall_s"] = round(time.perf_counter() - start, 1)
        save(results, out)
        write_jsonl(out / "answers.jsonl", answers_rows)
    print(markdown(results))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, answers: {out / 'answers.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
