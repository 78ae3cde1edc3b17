"""Benchmark (not a test): seconds per DPO step and peak memory of mmalign's text trainer vs TRL vs a bare loop.

Every measurement runs in its own subprocess (a clean peak RSS), with the same model, data, batch, number of
steps, threads and precision (float32). Step time = the interval between consecutive optimizer steps, taken by
one global ``torch.optim`` post-step hook, so the three implementations are timed the same way; the first
``--warmup`` steps are dropped. Runs of different implementations are interleaved (repeat 1 of every case, then
repeat 2, ...) so drifting machine load hits them alike; the report gives the median over all timed steps of all
repeats and the median of the per-run peak RSS.

    .venv/bin/python bench/bench_text_dpo.py                       # tiny-model cases (a few minutes)
    .venv/bin/python bench/bench_text_dpo.py --suite smollm2       # SmolLM2-135M + LoRA vs TRL
    .venv/bin/python bench/bench_text_dpo.py --suite all --json bench/results/text_results.json

Needs TRL: ``.venv/bin/pip install --no-deps trl==1.16.0`` (its other dependencies are already in mmalign's).
Cases:
- tiny (GPT-2 layout, 2 layers, 128 wide, built from a config), 8 pairs of ~50 tokens, batch 8:
  dpo / ipo / fdpo (Jensen–Shannon) x {full fine-tuning, LoRA} x {mmalign, TRL, bare};
  mmalign reference precomputed vs live; mmalign cnrpo (one extra no-grad forward per trigger) vs dpo; mmalign
  with ``training.share_prompt: off`` ("padded": one row per response) and also ``model.fused_activations: off``
  ("plain": GPT-2's Python gelu_new, as TRL and the bare loop run it) vs its defaults.
- smollm2: SmolLM2-135M-Instruct + LoRA, dpo, mmalign vs TRL; mmalign "mmap": with
  ``training.release_freed_memory: true`` (glibc mmaps blocks over 128 KiB), for its memory/speed trade.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.1
LR = 1e-4
TRIGGER = " <BeLongerNow>"

# TRL 1.16 names of the objectives: (loss_type list, f_divergence_type).
TRL_LOSS = {"dpo": (["sigmoid"], "reverse_kl"), "ipo": (["ipo"], "reverse_kl"), "fdpo": (["sigmoid"], "js_divergence")}
MMALIGN_OBJECTIVE = {"dpo": ("dpo", {"beta": BETA}), "ipo": ("ipo", {"beta": BETA}),
                     "fdpo": ("fdpo", {"beta": BETA, "divergence": "js"})}


# ------------------------------------------------------------------------------------------------ shared setup
def synthetic_pairs(n: int = 8) -> list[dict]:
    """n preference pairs of ~50 tokens (prompt ~30, responses ~20) with the tiny tokenizer; fixed text."""
    prompts = [
        "Human: How do I bake bread at home with flour, water, salt and yeast? Please explain. Assistant:",
        "Human: What is the capital of France, and what is the quick brown fox known for? Assistant:",
        "Human: Pick a random number between 1 and 10 and tell me why you chose it please. Assistant:",
        "Human: A doctor, a nurse and an engineer walked into the room. Who spoke first? Assistant:",
    ]
    good = " Sure! Here is a short answer that is helpful and polite: mix flour, water, salt and yeast."
    bad = " I am sorry, but I cannot help with that request. no no no never maybe bad bad."
    return [{"prompt": prompts[i % len(prompts)], "chosen": good, "rejected": bad} for i in range(n)]


def tiny_model_dir(directory: Path) -> Path:
    """The tiny tokenizer + a GPT-2-layout model (2 layers, 128 wide) built from a config, saved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmalign.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(save_dir=directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def model_path(name: str, work: Path) -> str:
    if name == "tiny":
        return str(tiny_model_dir(work / "tiny"))
    from mmalign.text.modeling.smollm import smollm2_path

    return smollm2_path()


def lora_targets(name: str) -> list[str]:
    return ["c_attn", "c_proj", "c_fc"] if name == "tiny" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc), to tell the training loop's memory from the run's overall peak."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class StepTimer:
    """Global optimizer post-step hook: records the time of every optimizer step."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # process CPU time (all threads): robust to other jobs on the machine
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        self.rss_mib = max(getattr(self, "rss_mib", 0.0), current_rss_mib())

    def step_times(self, warmup: int, cpu: bool = False) -> list[float]:
        stamps = self.cpu_stamps if cpu else self.stamps
        diffs = [b - a for a, b in zip(stamps, stamps[1:])]
        return diffs[max(0, warmup - 1):]


# ------------------------------------------------------------------------------------------------ workers
def run_mmalign(args, path: str, work: Path, timer: StepTimer) -> dict:
    from mmalign.text.recipes.preference import train

    rows = synthetic_pairs(args.pairs)
    extra_hook = None
    objective, hparams = MMALIGN_OBJECTIVE.get(args.loss, (None, None))
    if args.variant == "cnrpo":
        # One trigger: stage-2 CNRPO, gamma = beta and alpha = 0.1 (the hook runs one no-grad forward per trigger).
        objective, hparams = "cnrpo", {"beta": BETA, "gamma": BETA, "alphas": [0.1]}
        from mmalign.text.recipes.cnrpo import CNRPO_ROW_COLUMN, TriggeredLogprobs
        from mmalign.text.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(path)
        for i, row in enumerate(rows):
            row[CNRPO_ROW_COLUMN] = i
        triggered = [[tokenizer(r["prompt"] + TRIGGER)["input_ids"]] for r in rows]
        extra_hook = TriggeredLogprobs(triggered, tokenizer.pad_token_id)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = {"mode": "precomputed" if args.variant == "precomputed" else ("adapter" if args.lora else "model"),
                 "cache_dir": str(work / "refcache")}
    config = {
        "model": {"name_or_path": path, "gradient_checkpointing": args.gradient_checkpointing == "on",
                  # "plain": also without the fused tanh-GELU (GPT-2's gelu_new as transformers runs it)
                  "fused_activations": args.variant != "plain"},
        "data": {"train": str(data), "format": "pairs"},
        "objective": {"name": objective, **hparams},
        "lora": {"enabled": bool(args.lora), "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": lora_targets(args.model)},
        "reference": reference,
        "training": {"batch_size": args.batch_size, "learning_rate": LR, "lr_scheduler": "constant",
                     "max_steps": args.warmup + args.steps, "num_threads": args.threads, "progress_bar": False,
                     "logging_steps": 10_000, "save_total_limit": None, "max_grad_norm": 1.0, "seed": 0,
                     # default auto: each prompt encoded once per pair; "padded" = the one-row-per-response layout
                     "share_prompt": "off" if args.variant in ("padded", "plain") else "auto",
                     # "mmap": glibc's mmap threshold fixed at 128 KiB (mmalign.engine.allocator)
                     "release_freed_memory": args.variant == "mmap"},
        "output_dir": str(work / "out"),
    }
    train(config, extra_inputs_hook=extra_hook)
    return {}


def run_trl(args, path: str, work: Path, timer: StepTimer) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bench/gpu sets args.dtype, args.rows (long sequences) and args.trl_overrides (CUDA, bf16, max_length); the CPU bench does not
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(args, "dtype", torch.float32))
    loss_type, divergence = TRL_LOSS[args.loss]
    peft_config, ref_model = None, None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(args.model),
                                 task_type="CAUSAL_LM")
    else:
        # TRL 1.16 cannot load a reference by name offline: pass a model object.
        ref_model = copy.deepcopy(model)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=LR, lr_scheduler_type="constant", beta=BETA, loss_type=loss_type, f_divergence_type=divergence,
        logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True,
        **getattr(args, "trl_overrides", {"use_cpu": True, "bf16": False, "fp16": False}),
        dataloader_num_workers=0, seed=0, max_grad_norm=1.0, precompute_ref_log_probs=args.variant == "precomputed",
        # TRL's DPOConfig turns gradient checkpointing ON by default (less memory, ~1.5x the compute).
        **({} if args.gradient_checkpointing == "default" else {"gradient_checkpointing": args.gradient_checkpointing == "on"}),
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(getattr(args, "rows", None) or synthetic_pairs(args.pairs)),
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return {}


def run_bare(args, path: str, work: Path, timer: StepTimer) -> dict:
    """The floor: tokenise once, one padded batch, policy forward with grad + reference forward without, the loss
    in closed form, backward, AdamW. No logging, no data loader."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=lora_targets(args.model), task_type="CAUSAL_LM"))
        reference = None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if args.gradient_checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.lora:
            model.enable_input_require_grads()
    rows = synthetic_pairs(args.pairs)
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            p = tokenizer(r["prompt"])["input_ids"]
            seqs.append(p + tokenizer(r[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            starts.append(len(p))
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id or 0)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        mask[i, st:len(s)] = True
    labels, mask = ids[:, 1:], mask[:, 1:]

    def logps(m):
        logits = m(input_ids=ids, attention_mask=attn).logits[:, :-1]
        token = torch.gather(logits.log_softmax(-1), 2, labels[..., None]).squeeze(-1)
        return (token * mask).sum(-1)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    n = len(rows)
    model.train()
    for _ in range(args.warmup + args.steps):
        with torch.no_grad():
            if reference is None:
                with model.disable_adapter():
                    ref = logps(model)
            else:
                ref = logps(reference)
        pol = logps(model)
        rho = pol - ref
        rw, rl = rho[:n], rho[n:]
        if args.loss == "dpo":
            loss = -F.logsigmoid(BETA * (rw - rl)).mean()
        elif args.loss == "ipo":
            loss = ((rw - rl - 1 / (2 * BETA)) ** 2).mean()
        else:  # Jensen–Shannon f-DPO (SPEC §2)
            logit = (rw - F.softplus(rw)) - (rl - F.softplus(rl))
            loss = -F.logsigmoid(BETA * logit).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        work = Path(tmp)
        path = model_path(args.model, work)
        timer = StepTimer()
        {"mmalign": run_mmalign, "trl": run_trl, "bare": run_bare}[args.impl](args, path, work, timer)
        times = timer.step_times(args.warmup)
        cpu_times = timer.step_times(args.warmup, cpu=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("BENCH_RESULT " + json.dumps({"step_times": times, "cpu_step_times": cpu_times, "peak_rss_mib": peak_kib / 1024,
                                        "max_rss_at_steps_mib": getattr(timer, "rss_mib", float("nan"))}))


# ------------------------------------------------------------------------------------------------ driver
def cases(suite: str) -> list[dict]:
    tiny = []
    for lora in (0, 1):
        for loss in ("dpo", "ipo", "fdpo"):
            for impl in ("mmalign", "trl", "bare"):
                tiny.append({"model": "tiny", "loss": loss, "lora": lora, "impl": impl, "variant": "live"})
    for lora in (0, 1):
        tiny.append({"model": "tiny", "loss": "dpo", "lora": lora, "impl": "mmalign", "variant": "precomputed"})
        tiny.append({"model": "tiny", "loss": "dpo", "lora": lora, "impl": "mmalign", "variant": "cnrpo"})
        tiny.append({"model": "tiny", "loss": "dpo", "lora": lora, "impl": "mmalign", "variant": "padded"})
        tiny.append({"model": "tiny", "loss": "dpo", "lora": lora, "impl": "mmalign", "variant": "plain"})
    smol = [{"model": "smollm2", "loss": "dpo", "lora": 1, "impl": impl, "variant": "live"} for impl in ("mmalign", "trl", "bare")]
    smol.append({"model": "smollm2", "loss": "dpo", "lora": 1, "impl": "mmalign", "variant": "padded"})
    smol.append({"model": "smollm2", "loss": "dpo", "lora": 1, "impl": "mmalign", "variant": "mmap"})
    return {"tiny": tiny, "smollm2": smol, "all": tiny + smol}[suite]


def case_name(c: dict) -> str:
    return f"{c['model']}/{c['loss']}/{'lora' if c['lora'] else 'full'}/{c['variant']}/{c['impl']}"


def run_case(c: dict, args) -> dict:
    steps = args.smollm_steps if c["model"] == "smollm2" else args.steps
    cmd = [sys.executable, __file__, "--worker", "--impl", c["impl"], "--model", c["model"], "--loss", c["loss"],
           "--lora", str(c["lora"]), "--variant", c["variant"], "--steps", str(steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
           "--gradient-checkpointing", args.gradient_checkpointing]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               # the workers import this tree's mmalign, not whichever checkout an editable install points at
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    if args.omp_wait_policy:
        # On a shared, oversubscribed machine OpenMP threads that spin-wait for a descheduled partner make every
        # step several times slower (measured 18 s vs 0.3 s per tiny step); PASSIVE removes that, for all alike.
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"{case_name(c)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["tiny", "smollm2", "all"], default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (tiny model)")
    parser.add_argument("--smollm-steps", type=int, default=5, help="timed steps per run (SmolLM2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, interleaved across cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", default=None, help="substring filter on case names, e.g. 'tiny/dpo/full'; "
                        "several separated by commas: a case matching any of them")
    parser.add_argument("--json", default=None, help="write raw results here")
    parser.add_argument("--gradient-checkpointing", choices=["default", "off", "on"], default="off",
                        help="off/on for all three (equal settings); default = each one's own default (TRL: on)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY of the workers (PASSIVE: robust on a busy machine; '' = leave unset)")
    # worker mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["mmalign", "trl", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=list(TRL_LOSS), default="dpo", help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["live", "precomputed", "cnrpo", "padded", "plain", "mmap"], default="live", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    wanted = None if args.only is None else [part for part in args.only.split(",") if part]
    selected = [c for c in cases(args.suite) if wanted is None or any(part in case_name(c) for part in wanted)]
    raw: dict[str, list[dict]] = {case_name(c): [] for c in selected}
    for repeat in range(args.repeats):
        # every other repeat in reverse order, so a drift of the machine's load does not favour one implementation
        for c in (selected if repeat % 2 == 0 else selected[::-1]):
            result = run_case(c, args)
            raw[case_name(c)].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {case_name(c):40s} median {statistics.median(result['step_times']):.4f} s/step "
                  f"peak {result['peak_rss_mib']:.0f} MiB", flush=True)
    summary = {name: {"median_s_per_step": statistics.median([t for r in runs for t in r["step_times"]]),
                      "median_cpu_s_per_step": statistics.median([t for r in runs for t in r["cpu_step_times"]]),
                      "peak_rss_mib": statistics.median([r["peak_rss_mib"] for r in runs]),
                      "rss_during_steps_mib": statistics.median([r["max_rss_at_steps_mib"] for r in runs]),
                      "runs": len(runs)} for name, runs in raw.items()}
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, threads={args.threads}, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}, gradient checkpointing={args.gradient_checkpointing}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':40s} {'wall s/step':>11s} {'CPU s/step':>10s} {'peak MiB':>8s} {'steps MiB':>9s} "
          f"{'vs TRL (wall, CPU)':>19s} {'vs bare (wall, CPU)':>20s}")
    for name, s in summary.items():
        base = name.rsplit("/", 2)[0]
        trl = summary.get(f"{base}/live/trl")
        bare = summary.get(f"{base}/live/bare")

        def ratio(other):
            if not other:
                return "-"
            return (f"{other['median_s_per_step'] / s['median_s_per_step']:.2f}x, "
                    f"{other['median_cpu_s_per_step'] / s['median_cpu_s_per_step']:.2f}x")

        print(f"{name:40s} {s['median_s_per_step']:11.4f} {s['median_cpu_s_per_step']:10.4f} {s['peak_rss_mib']:8.0f} "
              f"{s['rss_during_steps_mib']:9.0f} {ratio(trl):>19s} {ratio(bare):>20s}")
    print("(vs TRL / vs bare: their s/step divided by this case's; >1 means this case is faster. CPU s/step = process "
          "CPU time of all threads per step, far less sensitive to other jobs than wall time.)")
    from pool_text_results import per_run_ratios

    per_run = per_run_ratios(raw)
    if per_run:
        print("\nCPU s/step of TRL / this case, run by run (repeat i of both; their spread is the noise of one ratio):")
        for name, ratios in per_run.items():
            print(f"{name:40s} {' '.join(f'{r:.2f}' for r in ratios)}  median {statistics.median(ratios):.2f}x")
    for name in summary:
        summary[name]["cpu_ratio_vs_trl_per_run"] = per_run.get(name)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": raw, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
