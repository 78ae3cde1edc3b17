"""In-process A/B of one step-level change (not a test): whole DPO steps — reference forward (no grad), policy
forward + backward, clip, fused AdamW — on the benchmark's model and data, alternating the variant every step in
ONE process, so that machine load hits A and B alike; reports medians of the per-pair CPU-time ratio.

    MMALIGN_BENCH=1 OMP_WAIT_POLICY=PASSIVE flock /work/notes/bench.lock .venv/bin/python bench/ab_step.py \\
        --model tiny --change float_mask --pairs 30
    ... bench/ab_step.py --model smollm2 --lora --change gqa --pairs 6

Changes (new vs old): float_mask — the shared-prompt mask given to sdpa as an additive float mask built once per
batch vs a boolean one (sdpa converts a boolean mask in every call); gqa — sdpa's grouped-query attention on the key/value heads vs transformers' repeat_kv copies; eager —
transformers' eager attention vs sdpa; silu_mul — the SiLU-gated MLP keeping one activation fewer
(mmalign.text.modeling.gated_mlp) vs transformers' forward; mmap — glibc mmaps blocks over 128 KiB (returned
to the system on free) vs its heap; trim — malloc_trim(0) after the step vs not; keep_norms — RMSNorm outputs
kept for backward vs recomputed (mmalign.text.modeling.norm_recompute, the default); lora_function — LoRA layers
as one autograd function (mmalign.engine.lora_function, the default) vs autograd over the direct forward's calls;
head_rows — the LM head's scored rows taken from all positions' hidden states (the default) vs after trimming
them through logits_to_keep; sigmoid_gelu — the tanh-GELU's forward as x·σ(2z) (mmalign.text.modeling.tanh_gelu, the
default) vs torch's fused kernel; fused_norm_rope — Llama-family RMSNorm and RoPE as one autograd function each
(mmalign.text.modeling.rms_norm, .rotary: the default) vs transformers' operations; last_layer — the last decoder
layer on the scored positions only (mmalign.text.modeling.scored_last_layer, the default) vs on every position.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHANGES = ("none", "float_mask", "gqa", "eager", "silu_mul", "mmap", "trim", "keep_norms", "lora_function", "head_rows",
           "sigmoid_gelu", "fused_norm_rope", "last_layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--change", choices=CHANGES, required=True)
    parser.add_argument("--pairs", type=int, default=20, help="A/B pairs (after 2 warm-up pairs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="smollm2: keep this many layers (random weights)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    import mmalign.text.modeling.logprobs as logprobs
    import ab_variants as variants
    from bench_text_dpo import LR, lora_targets, model_path, synthetic_pairs
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.modeling.loading import apply_lora, load_causal_lm, load_tokenizer
    from mmalign.text.modeling.references import AdapterReference, FrozenModelReference

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="ab-step-") as tmp:
        path = model_path(args.model, Path(tmp))
        tokenizer = load_tokenizer(path)
        if args.layers:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(path)
            config.num_hidden_layers = args.layers
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = load_causal_lm(path)
    import copy

    reference = None if args.lora else copy.deepcopy(model).requires_grad_(False)
    if args.lora:
        model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=lora_targets(args.model))
        ref_fn = AdapterReference(model)
    else:
        ref_fn = FrozenModelReference(reference)
    model.train()
    examples, _ = parse_preference_rows(synthetic_pairs(8))
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(PreferenceTokenizer(tokenizer)(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)

    def step(new: bool) -> float:
        start = time.process_time()
        with variants.variant(args.change, new, (model, reference)):
            b = dict(batch)
            ref = ref_fn(model, b)
            pol, _ = logprobs.batch_logprobs(model, b)
            rho = pol - ref
            margin = rho[b["chosen_index"][:, 0]] - rho[b["rejected_index"][:, 0]]
            loss = F.softplus(-0.1 * margin).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return time.process_time() - start

    ratios, times = [], {True: [], False: []}
    for i in range(args.pairs + 2):
        order = (True, False) if i % 2 == 0 else (False, True)
        t = {new: step(new) for new in order}
        if i >= 2:
            ratios.append(t[False] / t[True])
            for new in t:
                times[new].append(t[new])
    print(f"{args.change}, {args.model} {'LoRA' if args.lora else 'full'}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}: CPU s/step median new {statistics.median(times[True]):.4f}, old "
          f"{statistics.median(times[False]):.4f}; old/new per pair: median {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}, "
          f"{len(ratios)} pairs; > 1: the change is faster)")


if __name__ == "__main__":
    main()
