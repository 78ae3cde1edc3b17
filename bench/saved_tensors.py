"""What a policy forward keeps for backward (not a test): walks the autograd graph of one DPO policy forward on the
benchmark's batch (8 pairs, shared prompt, LoRA r=8 on every projection, the trainer's fast paths) and sums the
saved tensors' storages by the node that keeps them (each storage counted once, at the first node found).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/saved_tensors.py --model smollm2 --lora --layers 30
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's mmalign, not the editable install's


def saved_storages(root, exclude=frozenset()) -> Counter:
    """bytes by node name of every distinct storage a node of the graph under ``root`` keeps for backward (storages
    in ``exclude``, the parameters', not counted)."""
    import torch

    seen, by_node, stack, visited = set(), Counter(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        tensors += list(getattr(node, "saved_tensors", ()) or ()) if hasattr(node, "saved_tensors") else []
        for value in tensors:
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage().data_ptr()
                    if key not in seen and key not in exclude:
                        seen.add(key)
                        by_node[node.name()] += t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return by_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="keep this many layers (random weights)")
    parser.add_argument("--repeat-kv", action="store_true", help="without mmalign's grouped-query sdpa")
    parser.add_argument("--keep-norms", action="store_true", help="without mmalign's RMSNorm-output recompute")
    args = parser.parse_args()

    import torch

    import mmalign.text.modeling.logprobs as logprobs
    from bench_text_dpo import lora_targets, model_path, synthetic_pairs
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.modeling.loading import apply_lora, fuse_activations, load_tokenizer

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="saved-") as tmp:
        path = model_path(args.model, Path(tmp))
        tokenizer = load_tokenizer(path)
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        if args.layers:
            config.num_hidden_layers = args.layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    fuse_activations(model)
    if args.lora:
        model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=lora_targets(args.model))
    model.train()
    examples, _ = parse_preference_rows(synthetic_pairs(8))
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prompt=True)(PreferenceTokenizer(tokenizer)(examples))
    import contextlib
    from unittest import mock

    with (mock.patch.object(logprobs, "grouped_query_sdpa", lambda m: contextlib.nullcontext()) if args.repeat_kv
          else contextlib.nullcontext()), (mock.patch.object(logprobs, "recompute_norm_outputs", lambda m: contextlib.nullcontext())
                                           if args.keep_norms else contextlib.nullcontext()):
        logps, _ = logprobs.batch_logprobs(model, dict(batch))
    # reading a node's saved RMSNorm output recomputes it (mmalign.text.modeling.norm_recompute): not kept, not counted
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    from mmalign.text.modeling import norm_recompute

    recomputed = norm_recompute._Output.recomputed
    norm_recompute._Output.recomputed = lambda self: (lambda t: exclude.add(t.untyped_storage().data_ptr()) or t)(recomputed(self))
    by_node = saved_storages(logps.sum().grad_fn, exclude)
    total = sum(by_node.values())
    tokens = int(batch["input_ids"].numel())
    print(f"{args.model} {'LoRA' if args.lora else 'full'}, {config.num_hidden_layers} layers, input {tuple(batch['input_ids'].shape)} "
          f"({tokens} tokens): saved {total / 2**20:.1f} MiB")
    for name, nbytes in by_node.most_common(25):
        print(f"  {name:40s} {nbytes / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
