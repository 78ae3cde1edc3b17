"""bench/image_flop_bound.py counts the benchmarked steps' FLOPs (tiny SD layout, one pair): the LoRA step must count
fewer FLOPs than the two-backbone full step, attention (the CPU SDPA kernel) and the backward must be counted."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import image_flop_bound as bound  # noqa: E402


def test_lora_step_counts_fewer_flops_than_the_full_step():
    counts = bound.count_layout("sd", pairs=1)
    full, lora, loop = (counts[name] for name in bound.VARIANTS["sd"])
    assert 0 < lora["counted"] < full["counted"]
    assert lora["trainable_params"] < full["trainable_params"]
    summary = bound.summary(counts, *bound.VARIANTS["sd"])
    assert summary["ceiling"] > 1 and summary["ceiling_counted_only"] > 1
    assert summary["attention_share"][0] > 0  # the CPU SDPA kernel is counted
    for step in (full, lora):
        assert any(key.startswith("backward/") for key in step["split"])
    # the reference forwards are the same in both: only the backward differs (no dW of the frozen weights)
    forward = {name: sum(v for k, v in counts[name]["split"].items() if k.startswith("forward/")) for name in counts}
    assert abs(forward["mmalign_lora"] / forward["naive_full"] - 1) < 0.05
    assert abs(loop["counted"] / lora["counted"] - 1) < 0.05  # the hand-written LoRA loop counts about the same
