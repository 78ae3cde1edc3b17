"""Online RLOO/GRPO step: mmalign.text.online against TRL 1.16's RLOOTrainer / GRPOTrainer, side by side.

Same model, prompts, k, max new tokens, reward (a regex count as a Python function), learning rate, β, threads (1),
float32; TRL with ``bf16=False`` and ``gradient_checkpointing=False`` set explicitly. Two models (``--model``):

- ``tiny``: a 0.6M-parameter Llama built from config, full fine-tuning with a frozen reference copy on both sides;
- ``smollm2``: SmolLM2-135M-Instruct (the offline GGUF, converted once) with LoRA r=8 on every projection on both
  sides, the adapter-disabled base as the reference.

Each run is its own subprocess (peak RSS is per run); runs are interleaved mmalign/TRL and repeated. The step
time is the median gap between consecutive step starts after two warm-up steps (generation + scoring + forward
+ backward + optimizer), taken from a hook on each side's step. Generation is timed apart (each side's sampler
call: mmalign's ``sample_completions``, TRL's ``model.generate``): ``gen_s`` per step, ``gen_tokens_per_s`` (response
tokens, the end token included, over the sampler's time) and ``train_s = step_s − gen_s`` (scoring, forwards,
backward, optimizer).

    python bench/bench_online.py --repeats 3 --steps 10 --out bench/results/online_results.json
    python bench/bench_online.py --model smollm2 --repeats 1 --steps 4 --out bench/results/online_smollm2_results.json

(SmolLM2: 2 prompts x k=4 x 8 new tokens per step, the step time is the gap between steps 3 and 4.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Say hello.", "How do I bake bread?", "Pick a random number.", "Can you help me?",
           "What is the capital of France?", "Who walked into the room?", "Tell me a story.", "Thanks!"] * 2
K, BATCH_PROMPTS, MAX_NEW, LR, BETA = 4, 4, 16, 1e-5, 0.05
# SmolLM2 on 2 shared CPU cores: 2 prompts x 4 samples x 8 new tokens per step keeps one command under ~8 minutes
SMOLLM2_SIZES = {"BATCH_PROMPTS": 2, "MAX_NEW": 8}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class GenerationTimer:
    """Wraps a sampler function: the wall time and the response tokens of each call."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def wrap(self, function, count):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(count(out, args, kwargs))
            return out

        return timed

    def summary(self) -> dict:
        seconds, tokens = self.seconds[2:], self.tokens[2:]  # the warm-up steps' calls left out, as for the step
        return {"gen_s": statistics.median(seconds), "gen_tokens_per_s": sum(tokens) / sum(seconds),
                "gen_tokens_per_step": statistics.median(tokens)}


def count_e(completions, **_):
    return [float(c.count("e")) for c in completions]


def _median_step(starts: list[float]) -> float:
    gaps = [b - a for a, b in zip(starts[2:], starts[3:])]
    return statistics.median(gaps)


def run_mmalign(algo: str, model_dir: str, steps: int, out: str, lora: bool) -> dict:
    import mmalign.text
    from mmalign.rewards import CallableReward
    from mmalign.text import rollout
    from mmalign.testing import write_jsonl

    starts: list[float] = []
    original = rollout.OnlineLoss.__call__

    def timed(self, model, batch):
        starts.append(time.perf_counter())
        return original(self, model, batch)

    rollout.OnlineLoss.__call__ = timed
    generation = GenerationTimer()
    rollout.sample_completions = generation.wrap(
        rollout.sample_completions, lambda samples, a, kw: int(sum(map(sum, samples.num_tokens)) + sum(map(sum, samples.finished))))
    prompts = Path(out) / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    cfg = {"model": {"name_or_path": model_dir}, "prompts": {"train": str(prompts)},
           "algorithm": {"name": algo, "beta": BETA, "divergence_in": "reward" if algo == "rloo" else "loss"},
           "sampling": {"k": K, "max_new_tokens": MAX_NEW},
           "training": {"batch_size": BATCH_PROMPTS, "max_steps": steps, "learning_rate": LR, "logging_steps": 1,
                        "progress_bar": False, "plot": False, "num_threads": 1, "lr_scheduler": "constant"},
           "output_dir": str(Path(out) / "mm")}
    if lora:
        cfg["lora"] = {"enabled": True, **LORA}
    mmalign.text.online(cfg, reward=CallableReward(lambda prompts, outputs: count_e(outputs), name="count_e"))
    return {"step_s": _median_step(starts), "steps": len(starts), **generation.summary()}


def run_trl(algo: str, model_dir: str, steps: int, out: str, lora: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, TrainerCallback

    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    starts: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    Config, Trainer = (RLOOConfig, RLOOTrainer) if algo == "rloo" else (GRPOConfig, GRPOTrainer)
    args = Config(output_dir=str(Path(out) / "trl"), use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False, per_device_train_batch_size=BATCH_PROMPTS * K, num_generations=K,
                  max_completion_length=MAX_NEW, max_steps=steps, learning_rate=LR, beta=BETA, logging_steps=1,
                  report_to=[], save_strategy="no", seed=42, temperature=1.0, lr_scheduler_type="constant",
                  dataloader_num_workers=0, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stops = torch.tensor([tokenizer.eos_token_id])

    def response_tokens(output, args, kwargs):  # up to the first end token, included (TRL's completion mask)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        completion = sequences[:, kwargs["input_ids"].shape[1]:].cpu()
        ended = torch.isin(completion, stops)
        first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], completion.shape[1], dtype=torch.long))
        return int(first.sum())

    generation = GenerationTimer()
    GenerationMixin.generate = generation.wrap(GenerationMixin.generate, response_tokens)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = Trainer(model=model, reward_funcs=count_e, args=args, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]), callbacks=[Timer()],
                      peft_config=peft_config)
    trainer.train()
    return {"step_s": _median_step(starts), "steps": len(starts), **generation.summary()}


def one(side: str, algo: str, model_dir: str, steps: int, lora: bool) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        result = (run_mmalign if side == "mmalign" else run_trl)(algo, model_dir, steps, out, lora)
    result["train_s"] = result["step_s"] - result["gen_s"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--algorithms", nargs="+", default=["rloo", "grpo"], help="rloo, grpo, group (mmalign only)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="tiny: full fine-tuning of a 0.6M Llama; smollm2: SmolLM2-135M-Instruct + LoRA")
    parser.add_argument("--out", default="bench/results/online_results.json")
    parser.add_argument("--one", nargs=3, metavar=("SIDE", "ALGO", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "smollm2":
        globals().update(SMOLLM2_SIZES)
    if args.one:
        one(*args.one, args.steps, args.model == "smollm2")
        return
    from mmalign.testing import save_tiny_model_and_tokenizer

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    results: dict = {"config": {"model": args.model, "lora": args.model == "smollm2", "k": K, "prompts_per_step": BATCH_PROMPTS, "max_new_tokens": MAX_NEW, "lr": LR,
                                "beta": BETA, "steps": args.steps, "load_before": os.getloadavg()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_dir = str(save_tiny_model_and_tokenizer(Path(tmp) / "tiny"))
        else:
            from mmalign.text.modeling.smollm import smollm2_path

            model_dir = smollm2_path()
        for repeat in range(args.repeats):
            for algo in args.algorithms:
                for side in ("mmalign",) if algo == "group" else ("mmalign", "trl"):  # TRL has no group objective
                    done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--model", args.model,
                                           "--one", side, algo, model_dir], env=env, capture_output=True, text=True)
                    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if line is None:
                        raise RuntimeError(f"{side} {algo} failed:\n{done.stderr[-3000:]}")
                    run = {"side": side, "algo": algo, "repeat": repeat, **json.loads(line[7:])}
                    results["runs"].append(run)
                    print(json.dumps(run), flush=True)
    results["config"]["load_after"] = os.getloadavg()
    summary = {}
    for algo in args.algorithms:
        med = {side: {key: statistics.median(r[key] for r in results["runs"] if r["side"] == side and r["algo"] == algo)
                      for key in ("step_s", "gen_s", "train_s", "gen_tokens_per_s", "peak_rss_mib")}
               for side in ("mmalign", "trl") if any(r["side"] == side and r["algo"] == algo for r in results["runs"])}
        summary[algo] = med
        if "trl" in med:
            pairs = [(m, t) for m in results["runs"] for t in results["runs"] if m["algo"] == t["algo"] == algo
                     and m["repeat"] == t["repeat"] and m["side"] == "mmalign" and t["side"] == "trl"]
            summary[algo].update(speedup_vs_trl=med["trl"]["step_s"] / med["mmalign"]["step_s"],
                                 per_pair_speedup=[t["step_s"] / m["step_s"] for m, t in pairs],
                                 train_speedup_vs_trl=med["trl"]["train_s"] / med["mmalign"]["train_s"],
                                 gen_speedup_vs_trl=med["mmalign"]["gen_tokens_per_s"] / med["trl"]["gen_tokens_per_s"],
                                 memory_ratio=med["mmalign"]["peak_rss_mib"] / med["trl"]["peak_rss_mib"])
    if "group" in summary and "rloo" in summary:  # the goal: online mDPO within 1.2x of RLOO's step
        summary["group_over_rloo_step"] = summary["group"]["mmalign"]["step_s"] / summary["rloo"]["mmalign"]["step_s"]
    results["summary"] = summary
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
