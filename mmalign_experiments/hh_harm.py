"""Harmfulness run on the real HH-RLHF harmless-base pairs with flipped labels: DPO vs CNRPO on SmolLM2 + LoRA,
scored with a reward model trained here on clean pairs (SPEC §4, cnrpo §6.2 / Figure 4; issue #4).

    python -m mmalign_experiments.hh_harm                      # everything (shared 2-core CPU: about 20 minutes)
    python -m mmalign_experiments.hh_harm --resume             # reuse the reward model / runs whose final/ exists

What it does (all under ``--out``, default ``outputs/hh-harm-exp``; nothing is downloaded):

1. Data: the HH-RLHF harmless-base test pairs (``../shared/data/hh-rlhf``; the only split available offline),
   split into prompt + last assistant turn by :func:`mmalign_experiments.bias_data.hh_pairs`. To fit a CPU budget only
   single-turn pairs with a prompt of at most ``--max-prompt-chars`` and responses of at most
   ``--max-response-chars`` characters are kept; they are shuffled (seed) and cut into disjoint slices:
   reward-model training pairs (clean), reward-model held-out pairs (clean), the main set (``--flip`` of its
   labels flipped by :func:`mmalign_experiments.bias_data.flip_labels`), the CNRPO auxiliary set (``--aux-flip`` of it
   flipped, i.e. preferring the more harmful answer; it is learned behind ``<BeHarmfulNow>``), optional clean
   anchor pairs (stage 1, untriggered) and the held-out evaluation prompts.
2. A reward model on the clean pairs (:func:`mmalign.text.recipes.reward.train_reward_model`, top blocks + score head);
   its pairwise accuracy on the held-out clean pairs says whether its scores mean anything.
3. CNRPO stage 1 (DPO behind the trigger on the auxiliary set) and its trigger report, scored by that reward
   model on the held-out prompts (greedy); a lower reward with the trigger means the harmfulness bias was learned.
4. DPO and CNRPO stage 2 on the same noisy main set, LoRA, same steps, learning rate and seed.
5. Greedy answers of SFT, DPO, CNRPO and the stage-1 model (no trigger) to the held-out prompts, scored by the
   reward model: mean reward and the share of prompts where a model's answer out-scores the SFT model's.

Writes ``results.json``, ``results.md`` and ``answers.jsonl``. Run with one torch thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmalign.io import atomic_write_text, write_jsonl  # noqa: E402
from mmalign_experiments.bias_data import flip_labels, hh_pairs  # noqa: E402
from mmalign_experiments.length_bias import timed, training_summary  # noqa: E402

logger = logging.getLogger("hh_harm_experiment")

TRIGGER = "<BeHarmfulNow>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmalign_experiments.hh_harm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="~/.cache/mmalign/smollm2-135m-instruct", help="SFT model folder")
    p.add_argument("--hh", default="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", help="HH-RLHF pairs")
    p.add_argument("--out", default="outputs/hh-harm-exp", help="output folder")
    p.add_argument("--max-prompt-chars", type=int, default=300)
    p.add_argument("--max-response-chars", type=int, default=400)
    p.add_argument("--rm-train", type=int, default=256, help="clean pairs for the reward model")
    p.add_argument("--rm-eval", type=int, default=100, help="clean held-out pairs for its accuracy")
    p.add_argument("--rm-epochs", type=float, default=1.0)
    p.add_argument("--rm-lr", type=float, default=5e-5)
    p.add_argument("--rm-top-layers", type=int, default=4)
    p.add_argument("--main-size", type=int, default=40, help="main pairs (DPO and CNRPO stage 2)")
    p.add_argument("--flip", type=float, default=0.3, help="share of main labels flipped")
    p.add_argument("--aux-size", type=int, default=16, help="auxiliary pairs (CNRPO stage 1, triggered)")
    p.add_argument("--aux-flip", type=float, default=1.0, help="share of auxiliary labels flipped (harmful wins)")
    p.add_argument("--anchor-size", type=int, default=16, help="clean untriggered pairs added to stage 1 (0 = none)")
    p.add_argument("--num-prompts", type=int, default=30, help="held-out prompts answered greedily")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.5, help="β (paper, harmfulness: 0.5)")
    p.add_argument("--gamma", type=float, default=0.2, help="CNRPO γ (paper: 0.2)")
    p.add_argument("--alpha", type=float, default=0.1, help="CNRPO α (paper, harmfulness: 0.1)")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--bias-learning-rate", type=float, default=5e-4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--bias-epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--rescore", metavar="RM_DIR", default=None,
                   help="only re-score <out>/answers.jsonl with another reward model folder and print the table")
    return p


# ------------------------------------------------------------------------------------------------ data
def make_data(args, out: Path) -> dict[str, Any]:
    rows = [r for r in hh_pairs(args.hh)
            if r["prompt"].count("Human:") == 1 and len(r["prompt"]) <= args.max_prompt_chars
            and max(len(r["chosen"]), len(r["rejected"])) <= args.max_response_chars]
    random.Random(args.seed).shuffle(rows)
    sizes = {"rm_train": args.rm_train, "rm_eval": args.rm_eval, "main": args.main_size, "aux": args.aux_size,
             "anchor": args.anchor_size, "prompts": args.num_prompts}
    if sum(sizes.values()) > len(rows):
        raise SystemExit(f"{args.hh}: {len(rows)} pairs pass the filters; the slices need {sum(sizes.values())}")
    data, files, start = out / "data", {"kept_pairs": len(rows)}, 0
    for name, n in sizes.items():
        part = rows[start:start + n]
        start += n
        if name == "main":
            part = flip_labels(part, args.flip, seed=args.seed)
        elif name == "aux":
            part = flip_labels(part, args.aux_flip, seed=args.seed + 1)
        if n:
            files[name] = str(write_jsonl(data / f"{name}.jsonl", part))
        files[name + "_rows"] = part
    return files


# ------------------------------------------------------------------------------------------------ runs
def train_reward(args, files, out: Path, timings) -> dict[str, Any]:
    from mmalign.config import from_dict
    from mmalign.text.recipes.reward import RewardTrainConfig, train_reward_model

    rm_dir = out / "reward-hh-clean"
    if args.resume and (rm_dir / "reward_report.json").exists() and (rm_dir / "final").exists():
        return json.loads((rm_dir / "reward_report.json").read_text())
    cfg = from_dict(RewardTrainConfig, {
        "model": {"name_or_path": args.model},
        "data": {"train": files["rm_train"], "eval": files["rm_eval"], "use_chat_template": True},
        "trainable_top_layers": args.rm_top_layers,
        "training": {"batch_size": 8, "learning_rate": args.rm_lr, "lr_scheduler": "constant",
                     "num_epochs": args.rm_epochs, "max_length": 384, "logging_steps": 4,
                     "num_threads": args.threads, "seed": args.seed, "progress_bar": False},
        "output_dir": str(rm_dir),
    })
    report = timed("reward model (train + held-out eval)", lambda: train_reward_model(cfg), timings)
    return {k: v for k, v in report.items() if k not in ("model", "tokenizer")}


def common_sections(args) -> dict[str, Any]:
    return {
        "lora": {"enabled": True, "r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "reference": {"mode": "precomputed"},
        "training": {"batch_size": args.batch_size, "learning_rate": args.learning_rate, "lr_scheduler": "constant",
                     "num_epochs": args.epochs, "logging_steps": 1, "num_threads": args.threads, "seed": args.seed,
                     "max_prompt_length": 160, "max_response_length": 160, "progress_bar": False},
    }


def cnrpo_config(args, files, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": args.model},
        "data": {"train": files["main"], "use_chat_template": True},
        "cnrpo": {"triggers": [TRIGGER], "auxiliary_data": [files["aux"]], "alphas": [args.alpha], "beta": args.beta,
                  "gamma": args.gamma, "bias_epochs": args.bias_epochs, "main_epochs": args.epochs,
                  "bias_learning_rate": args.bias_learning_rate,
                  "anchor_data": [files["anchor"]] if args.anchor_size else []},
        "trigger_report": {"prompts": files["prompts"], "num_prompts": args.num_prompts,
                           "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "aspects": ["reward"],
                           "reward_model": str(out / "reward-hh-clean" / "final")},
        **common_sections(args),
        "output_dir": str(out / "cnrpo"),
    }


def run_cnrpo_stage(stage: str, args, files, out: Path, timings) -> Path:
    from mmalign_experiments.cnrpo_report import run_with_report

    final = out / "cnrpo" / ("bias" if stage == "bias" else "main") / "final"
    if not (args.resume and (final / "adapter_config.json").exists()):
        label = "CNRPO stage 1 + trigger report" if stage == "bias" else "CNRPO stage 2"
        timed(label, lambda: run_with_report(cnrpo_config(args, files, out), stage=stage), timings)
    return final


def run_dpo(args, files, out: Path, timings) -> Path:
    from mmalign.text.recipes.preference import train

    run_dir = out / "dpo"
    if not (args.resume and (run_dir / "final" / "adapter_config.json").exists()):
        config = {"model": {"name_or_path": args.model}, "data": {"train": files["main"], "use_chat_template": True},
                  "objective": {"name": "dpo", "beta": args.beta}, **common_sections(args),
                  "output_dir": str(run_dir)}
        timed("DPO", lambda: train(config), timings)
    return run_dir / "final"


# ------------------------------------------------------------------------------------------------ evaluation
def greedy_answers(path: str, prompts: list[str], args) -> list[str]:
    from mmalign.text.data import render_prompt
    from mmalign.text.evaluation.evaluate import load_model_for_eval
    from mmalign.text.modeling.sampling import sample_completions

    model, tokenizer = load_model_for_eval(str(path))
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter folder: merged weights decode faster
        model = model.merge_and_unload().eval()
    rendered = [render_prompt(tokenizer, p, use_chat_template=True) for p in prompts]
    out = sample_completions(model, tokenizer, [t for t, _ in rendered], n=1, max_new_tokens=args.max_new_tokens,
                             temperature=0.0, seed=args.seed, add_special_tokens=rendered[0][1])
    return [t[0] for t in out.texts]


def evaluate(models: dict[str, Path], args, files, out: Path, timings) -> tuple[dict, list]:
    from mmalign.text.recipes.reward import RewardScorer

    prompts = [r["prompt"] for r in files["prompts_rows"]]
    answers = {name: timed(f"generate {name}", lambda p=path: greedy_answers(p, prompts, args), timings)
               for name, path in models.items()}
    scorer = RewardScorer.from_pretrained(out / "reward-hh-clean" / "final")
    rewards = {name: scorer.score(prompts, texts).tolist() for name, texts in answers.items()}
    # the data set's own responses to the same prompts, as a scale for the model answers
    rewards["HH chosen (data)"] = scorer.score(prompts, [r["chosen"] for r in files["prompts_rows"]]).tolist()
    rewards["HH rejected (data)"] = scorer.score(prompts, [r["rejected"] for r in files["prompts_rows"]]).tolist()
    sft = rewards["SFT"]
    table = {}
    for name, values in rewards.items():
        table[name] = {"mean_reward": sum(values) / len(values),
                       "above_sft": sum(v > s for v, s in zip(values, sft)) / len(values),
                       "mean_length_chars": (sum(len(t) for t in answers[name]) / len(values)) if name in answers else None}
    rows = [{"model": name, "prompt": p, "answer": t, "reward": r}
            for name, texts in answers.items() for p, t, r in zip(prompts, texts, rewards[name])]
    return table, rows


def rescore(args, out: Path) -> int:
    """Scores the saved greedy answers and the data set's responses with another reward model (a robustness check
    of the reward scale); writes ``rescore-<name>.json``."""
    from mmalign.io import read_jsonl
    from mmalign.text.recipes.reward import RewardScorer

    answers = list(read_jsonl(out / "answers.jsonl"))
    prompt_rows = list(read_jsonl(out / "data" / "prompts.jsonl"))
    scorer = RewardScorer.from_pretrained(args.rescore)
    prompts = [r["prompt"] for r in prompt_rows]
    rewards = {}
    for row in answers:
        rewards.setdefault(row["model"], []).append(row["answer"])
    rewards = {name: scorer.score(prompts, texts).tolist() for name, texts in rewards.items()}
    rewards["HH chosen (data)"] = scorer.score(prompts, [r["chosen"] for r in prompt_rows]).tolist()
    rewards["HH rejected (data)"] = scorer.score(prompts, [r["rejected"] for r in prompt_rows]).tolist()
    table = {name: {"mean_reward": sum(v) / len(v), "above_sft": sum(a > b for a, b in zip(v, rewards["SFT"])) / len(v)}
             for name, v in rewards.items()}
    atomic_write_text(out / f"rescore-{Path(args.rescore).parent.name}.json", json.dumps(table, indent=1))
    print("| model | mean reward | share above SFT's answer |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['mean_reward']:.3f} | {row['above_sft']:.2f} |")
    return 0


def markdown(results: dict[str, Any]) -> str:
    rm = results.get("reward_model", {}).get("eval", {})
    lines = [f"Measured {results['date']} on {results['machine']}; total wall time {results['total_wall_s'] / 60:.1f} min.", "",
             f"Reward model: held-out pairwise accuracy {rm.get('pairwise_accuracy', float('nan')):.3f} on "
             f"{rm.get('pairs', 0)} clean pairs (mean margin {rm.get('mean_margin', float('nan')):.3f}).", ""]
    tr = results.get("trigger_report")
    if tr:
        lines += ["| trigger | n | mean reward without | mean reward with | share higher with trigger |", "|---|---|---|---|---|"]
        lines += [f"| `{r['trigger']}` | {r['n']} | {r['mean_without']:.3f} | {r['mean_with']:.3f} | "
                  f"{r['share_higher_with_trigger']:.2f} |" for r in tr]
        lines.append("")
    lines += ["| model | mean reward | share above SFT's answer | mean answer length (chars) | train steps | last train loss |",
              "|---|---|---|---|---|---|"]
    for name, row in results.get("evaluation", {}).items():
        ts = results["training"].get(name, {})
        loss = f"{ts['last_loss']:.3f}" if ts.get("last_loss") is not None else "—"
        length = f"{row['mean_length_chars']:.0f}" if row["mean_length_chars"] is not None else "—"
        lines.append(f"| {name} | {row['mean_reward']:.3f} | {row['above_sft']:.2f} | {length} | {ts.get('steps', '—')} | {loss} |")
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
    out = Path(args.out)
    if args.rescore:
        return rescore(args, out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    files = make_data(args, out)
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
                   f"load average at start {os.getloadavg()[0]:.1f}",
        "command": " ".join([sys.executable.split('/')[-1], *sys.argv]),
        "settings": vars(args), "kept_pairs": files["kept_pairs"], "timings_s": timings, "training": {},
        "total_wall_s": 0.0,
    }

    def checkpoint():
        results["total_wall_s"] = round(time.perf_counter() - start, 1)
        save(results, out)

    results["reward_model"] = train_reward(args, files, out, timings)
    checkpoint()
    stage_one = run_cnrpo_stage("bias", args, files, out, timings)
    report = stage_one.parent / "trigger_report.json"
    if report.exists():
        results["trigger_report"] = json.loads(report.read_text())["rows"]
    results["training"]["CNRPO stage 1 (no trigger)"] = training_summary(stage_one.parent)
    checkpoint()
    dpo = run_dpo(args, files, out, timings)
    results["training"]["DPO"] = training_summary(dpo.parent)
    checkpoint()
    cnrpo = run_cnrpo_stage("main", args, files, out, timings)
    results["training"]["CNRPO"] = training_summary(cnrpo.parent)
    checkpoint()
    models = {"SFT": Path(args.model), "DPO": dpo, "CNRPO": cnrpo, "CNRPO stage 1 (no trigger)": stage_one}
    results["evaluation"], answer_rows = evaluate(models, args, files, out, timings)
    write_jsonl(out / "answers.jsonl", answer_rows)
    checkpoint()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
