"""Generation alone, as online training samples: mmalign's ``sample_completions`` with the lean decoder
(``fast_decode=True``), without it (the transformers forward per token), and transformers' ``generate``
(``num_return_sequences=k``, ``do_sample=True``, the peer's sampler in TRL's trainers), interleaved in one process.

Same model, prompts, k, max new tokens, one thread, float32; ``--model smollm2`` adds LoRA r=8 on every projection
(as ``bench_online.py``). Reports response tokens per second (end token included) and per-call medians.

    python bench/bench_sampler.py --model tiny --repeats 7
    python bench/bench_sampler.py --model smollm2 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["Say hello.", "How do I bake bread?", "Pick a random number.", "Can you help me?"]
SIZES = {"tiny": (4, 16), "smollm2": (2, 8)}  # (prompts, max new tokens): bench_online.py's step
K = 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from mmalign.testing import save_tiny_model_and_tokenizer
    from mmalign.text.modeling.loading import apply_lora, load_causal_lm, load_tokenizer
    from mmalign.text.modeling.sampling import sample_completions, stop_token_ids

    torch.set_num_threads(1)
    num_prompts, max_new = SIZES[args.model]
    prompts = PROMPTS[:num_prompts]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_dir = str(save_tiny_model_and_tokenizer(Path(tmp) / "tiny"))
        else:
            from mmalign.text.modeling.smollm import smollm2_path

            model_dir = str(smollm2_path())
        tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    if args.model == "smollm2":
        model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS)
    model.eval()
    stops = torch.tensor(stop_token_ids(model, tokenizer))

    def ours(fast: bool, seed: int) -> int:
        samples = sample_completions(model, tokenizer, prompts, n=K, max_new_tokens=max_new, seed=seed, fast_decode=fast)
        return int(sum(map(sum, samples.num_tokens)) + sum(map(sum, samples.finished)))

    def generate(seed: int) -> int:
        torch.manual_seed(seed)
        tokenizer.padding_side = "left"
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=True, num_return_sequences=K, max_new_tokens=max_new,
                                 top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id)
        completion = out[:, encoded["input_ids"].shape[1]:]
        ended = torch.isin(completion, stops)
        first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], completion.shape[1], dtype=torch.long))
        return int(first.sum())

    sides = {"lean": lambda s: ours(True, s), "model_forward": lambda s: ours(False, s), "generate": generate}
    runs = {name: [] for name in sides}
    for name, call in sides.items():  # warm-up
        call(0)
    for repeat in range(args.repeats):
        for name, call in sides.items():
            start = time.perf_counter()
            tokens = call(repeat + 1)
            runs[name].append((time.perf_counter() - start, tokens))
    summary = {name: {"call_s": statistics.median(t for t, _ in r),
                      "tokens_per_s": sum(n for _, n in r) / sum(t for t, _ in r)} for name, r in runs.items()}
    summary["lean_over_generate"] = summary["lean"]["tokens_per_s"] / summary["generate"]["tokens_per_s"]
    summary["lean_over_model_forward"] = summary["lean"]["tokens_per_s"] / summary["model_forward"]["tokens_per_s"]
    result = {"config": {"model": args.model, "lora": args.model == "smollm2", "prompts": num_prompts, "k": K,
                         "max_new_tokens": max_new, "repeats": args.repeats, "load": os.getloadavg(),
                         "torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "runs": runs, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"config": result["config"], "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
