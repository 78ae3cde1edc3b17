"""In-process A/B of a step-level change on SmolLM2-135M's layout (not a test): forward + backward of the
shared-prompt log-probs (the policy half of a DPO step), LoRA on the seven projections, alternating A and B every
iteration in ONE process so that machine load hits both alike; reports the median per-pair CPU-time ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ab_step_parts.py --change scored_head --layers 30 --pairs 12

scored_head: the LM head on the scored rows only (mmalign.text.modeling.scored_head) vs all kept positions + a gather.
(A SiLU-gate variant that saved one MLP activation fewer was measured with the same loop and dropped, see
bench/RESULTS.md.) Random weights of SmolLM2's shapes
(``--layers`` of 30 kept; vocabulary 49,152), the benchmark's 8 synthetic pairs and SmolLM2's tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", choices=["scored_head"], required=True)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=12, help="A/B iterations (after 2 warm-up pairs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import mmalign.text.modeling.logprobs as logprobs
    from bench_text_dpo import synthetic_pairs
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.modeling.loading import apply_lora, load_tokenizer
    from mmalign.text.smollm import smollm2_path

    torch.set_num_threads(args.threads)
    path = smollm2_path()
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tokenizer = load_tokenizer(path)
    examples, _ = parse_preference_rows(synthetic_pairs(8))
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(PreferenceTokenizer(tokenizer)(examples))
    original_hook = logprobs.lm_head_on_rows

    @contextlib.contextmanager
    def no_hook(*_args, **_kwargs):
        yield None

    def set_variant(new: bool) -> None:
        logprobs.lm_head_on_rows = original_hook if new else no_hook

    def one(new: bool) -> float:
        set_variant(new)
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        sums, _ = logprobs.batch_logprobs(model, dict(batch))
        sums.sum().backward()
        return time.process_time() - start

    ratios, times = [], {True: [], False: []}
    for i in range(args.pairs + 2):
        order = (True, False) if i % 2 == 0 else (False, True)
        t = {new: one(new) for new in order}
        if i >= 2:
            ratios.append(t[False] / t[True])
            for new in t:
                times[new].append(t[new])
    print(f"{args.change}, {args.layers} layers, {args.threads} threads, load average {os.getloadavg()[0]:.1f}: "
          f"CPU s per forward+backward median new {statistics.median(times[True]):.3f}, "
          f"old {statistics.median(times[False]):.3f}; old/new per pair: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs; > 1: the change is faster)")


if __name__ == "__main__":
    main()
