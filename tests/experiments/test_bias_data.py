"""Generators of preference sets with a known spurious factor (SPEC §4, §5)."""
import re
from pathlib import Path

import pytest

from mmalign.resources import MissingDataFile
from mmalign_experiments import bias_data as bd

HH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def test_sycophancy_template_and_prefix_rates():
    rows = bd.sycophancy_pairs(2000, seed=0)
    assert all(r["prompt"].endswith(f"I think the answer is {r['answer']} but I'm really not sure.") for r in rows)
    assert all(str(r["answer"]) in r["chosen"] and str(r["answer"]) not in r["rejected"].split()[-1] for r in rows)
    chosen_rate = sum(r["prefix_chosen"] for r in rows) / len(rows)
    rejected_rate = sum(r["prefix_rejected"] for r in rows) / len(rows)
    assert abs(chosen_rate - 0.8) < 0.03 and abs(rejected_rate - 0.2) < 0.03
    assert all(r["chosen"].startswith(bd.SYCOPHANCY_PREFIX) == bool(r["prefix_chosen"]) for r in rows)
    assert bd.sycophancy_pairs(5, seed=3) == bd.sycophancy_pairs(5, seed=3)


def test_sycophancy_probes_isolate_the_prefix():
    rows = bd.sycophancy_pairs(10, seed=1)
    pairs = bd.prefix_counterfactuals(rows)
    assert len(pairs) == 20
    assert all(p["with"] == f"{bd.SYCOPHANCY_PREFIX} {p['without']}" and bd.SYCOPHANCY_PREFIX not in p["without"] for p in pairs)
    balanced = bd.prefix_balanced_pairs(400, seed=2)
    assert all(r["prefix_chosen"] == r["prefix_rejected"] for r in balanced)
    assert 0.4 < sum(r["prefix_chosen"] for r in balanced) / 400 < 0.6


def test_length_bias_share_is_exact_and_the_true_preference_is_checkable():
    rows = bd.length_bias_pairs(200, eps=0.3, seed=0)
    biased = [r for r in rows if r["biased"]]
    assert len(biased) == 60
    assert all(len(r["chosen"]) > 3 * len(r["rejected"]) for r in biased)
    clean = [r for r in rows if not r["biased"]]
    assert all(r["chosen"].rstrip(".").split()[-1] == str(r["answer"]) for r in clean)
    assert all(r["rejected"].rstrip(".").split()[-1] != str(r["answer"]) for r in clean)
    with pytest.raises(ValueError, match="eps"):
        bd.length_bias_pairs(10, eps=1.5)


def test_hh_pairs_and_flipped_labels(tmp_path):
    if not HH.is_file():
        raise MissingDataFile(f"{HH} (the shared HH-RLHF data beside the checkout)")
    rows = bd.hh_pairs(HH, limit=50)
    assert len(rows) == 50
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["chosen"].strip() and r["chosen"] != r["rejected"] for r in rows)
    assert rows[0]["source_row"] >= 1  # 1-based, like every error message
    flipped = bd.flip_labels(rows, 0.2, seed=0)
    assert sum(r["flipped"] for r in flipped) == 10
    for original, new in zip(rows, flipped):
        swapped = (new["chosen"], new["rejected"]) == (original["rejected"], original["chosen"])
        assert swapped == bool(new["flipped"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'chosen': no"):
        bd.hh_pairs(bad)


def test_decision_prompts_fill_every_attribute_explicitly():
    prompts = bd.decision_prompts()
    assert len(prompts) == 8 * 4 * 3 * 5
    assert not any("[" in p["prompt"] for p in prompts)
    assert all(p["age"] in p["prompt"] and p["gender"] in p["prompt"] and p["race"] in p["prompt"] for p in prompts)
    with pytest.raises(ValueError, match="lacks the placeholder"):
        bd.decision_prompts(["A [AGE] person. Yes?"])
    pairs = bd.biased_decision_pairs(prompts, attribute="race", favoured="white", seed=0)
    yes_rate = lambda value: sum(p["chosen"] == "Yes." for p in pairs if p["race"] == value) / sum(p["race"] == value for p in pairs)
    assert yes_rate("white") > 0.8 and yes_rate("Black") < 0.45


def test_jsonl_roundtrip_is_atomic_and_errors_name_the_line(tmp_path):
    path = bd.write_jsonl(tmp_path / "s.jsonl", bd.sycophancy_pairs(3))
    assert bd.read_jsonl(path) == bd.sycophancy_pairs(3)
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl"]
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="b.jsonl: line 2"):
        bd.read_jsonl(broken)


def test_length_probe_pairs_differ_only_in_length_or_only_in_the_answer():
    questions = [{"prompt": f"What is {a} + 3?", "answer": a + 3} for a in range(10, 30)]
    probes = bd.length_probe_pairs(questions, seed=1)
    assert len(probes["length"]) == len(probes["target"]) == 20
    for q, length, target in zip(questions, probes["length"], probes["target"]):
        assert length["prompt"] == target["prompt"] == q["prompt"]
        # both correct: the same number, the chosen one padded with filler
        assert re.findall(r"-?\d+", length["chosen"]) == re.findall(r"-?\d+", length["rejected"]) == [str(q["answer"])]
        assert len(length["chosen"]) > 2 * len(length["rejected"])
        assert re.findall(r"-?\d+", target["chosen"]) == [str(q["answer"])]
        assert re.findall(r"-?\d+", target["rejected"]) != [str(q["answer"])]
    assert bd.length_probe_pairs(questions, seed=1) == probes
