"""The f-DPO frontier's summaries over seeds (on hand-made cells) and its MiniLM-probe reward's pieces."""
import json
import math

import pytest
import torch

from mmalign_experiments.embedding_reward import binomial_p_above_half, dialogue_text, fit_probe, train_probe
from mmalign_experiments.fdpo_frontier import ece_curve
from mmalign_experiments.fdpo_report import mean_ece_curves, paired_rule, per_seed_table, plot_ece_curves, rule_table

LABELS = ["SFT", "RKL (DPO)", "FKL", "JS"]


def _row(seed, method, entropy, ece, reward=0.0, curve=()):
    return {"seed": seed, "method": method, "predictive_entropy": entropy, "ece": ece, "reward": reward,
            "accuracy": 0.5, "ece_curve": [list(p) for p in curve]}


def _cells():
    rows = []
    for seed in (0, 1, 2):
        rows.append(_row(seed, "SFT", 3.0, 0.10))
        rows.append(_row(seed, "RKL (DPO)", 2.0 + seed / 10, 0.20, reward=1.0, curve=[(2, 0.15), (4, 0.20)]))
        # FKL: more diverse and better calibrated in every seed
        rows.append(_row(seed, "FKL", 2.5 + seed / 10, 0.15, reward=0.5, curve=[(2, 0.12), (4, 0.15)]))
    # JS: more diverse in seeds 0 and 1 only, and missing seed 2 (not finished)
    rows += [_row(0, "JS", 2.1, 0.10), _row(1, "JS", 1.9, 0.10)]
    return rows


def test_paired_rule_counts_seeds_and_needs_every_seed():
    verdicts = {v["method"]: v for v in paired_rule(_cells(), LABELS)}
    assert "SFT" not in verdicts and "RKL (DPO)" not in verdicts
    fkl, js = verdicts["FKL"], verdicts["JS"]
    assert (fkl["seeds"], fkl["entropy_higher"], fkl["ece_lower"], fkl["holds"]) == (3, 3, 3, True)
    assert fkl["d_predictive_entropy"] == pytest.approx(0.5) and fkl["d_ece"] == pytest.approx(-0.05)
    assert fkl["d_reward"] == pytest.approx(-0.5)
    # JS: two shared seeds; entropy higher in seed 0 only (2.1 > 2.0, 1.9 < 2.1): the claim does not hold
    assert (js["seeds"], js["entropy_higher"], js["ece_lower"], js["holds"]) == (2, 1, 2, False)
    table = rule_table(list(verdicts.values()))
    assert "| FKL | 3 | 3/3 | 3/3 | yes |" in table and "| JS | 2 | 1/2 | 2/2 | no |" in table


def test_per_seed_table_marks_unfinished_cells():
    table = per_seed_table(_cells(), LABELS, "predictive_entropy")
    assert "| seed 0 | seed 1 | seed 2 | mean |" in table
    assert "| JS | 2.100 | 1.900 | – | 2.000 |" in table
    assert "| FKL | 2.500 | 2.600 | 2.700 | 2.600 |" in table


def test_mean_ece_curves_start_at_the_sft_ece(tmp_path):
    curves = mean_ece_curves(_cells(), LABELS)
    assert curves["RKL (DPO)"] == [(0, pytest.approx(0.10)), (2, pytest.approx(0.15)), (4, pytest.approx(0.20))]
    assert "JS" not in curves and "SFT" not in curves  # JS logged no curve
    plot_ece_curves(tmp_path / "ece.png", _cells(), LABELS)
    assert (tmp_path / "ece.png").stat().st_size > 0


def test_ece_curve_reads_the_trainers_metrics(tmp_path):
    lines = [{"step": 1, "loss": 0.7}, {"step": 2, "eval_ece": 0.25, "eval_loss": 0.6}, {"step": 4, "eval_ece": 0.125}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ece_curve(tmp_path) == [(2, 0.25), (4, 0.125)]
    assert ece_curve(tmp_path / "missing") == []


def test_binomial_p_value():
    assert binomial_p_above_half(4, 4) == 1 / 16 and binomial_p_above_half(0, 4) == 1.0
    assert binomial_p_above_half(3, 4) == 5 / 16
    # the design's threshold: 102 of 180 is significant at 5 %, 101 is not
    assert binomial_p_above_half(102, 180) < 0.05 < binomial_p_above_half(101, 180)
    with pytest.raises(ValueError):
        binomial_p_above_half(5, 4)


def test_fit_probe_separates_separable_pairs():
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(8, generator=g)
    diff = torch.randn(256, 8, generator=g)
    diff = diff[(diff @ true_w).abs() > 1.0][:64]  # a clear margin, so the regularised fit separates every pair
    diff = diff * torch.sign(diff @ true_w).unsqueeze(1)  # every pair's chosen side has the larger true reward
    w = fit_probe(diff)
    assert bool(((diff @ w) > 0).all())
    assert torch.nn.functional.cosine_similarity(w, true_w, dim=0) > 0.8
    with pytest.raises(ValueError):
        fit_probe(torch.zeros(1, 8))


class _KeywordEmbedder:
    """Stands in for MiniLM: 'kind' -> e0, 'rude' -> e1 (so the probe must learn to prefer kindness)."""
    max_tokens = 16

    def __call__(self, texts):
        return torch.tensor([[float("kind" in t), float("rude" in t)] for t in texts])


def test_train_probe_reports_heldout_accuracy_and_refuses_overlap():
    rows = [{"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": f" kind {i}", "rejected": f" rude {i}"}
            for i in range(12)]
    probe = train_probe(rows[:8], rows[8:], embedder=_KeywordEmbedder())
    assert probe.report["pairwise_accuracy"] == 1.0 and probe.report["heldout_correct"] == 4
    assert math.isclose(probe.report["p_vs_chance"], 1 / 16)
    kind, rude = probe.score(["\n\nHuman: x\n\nAssistant:"] * 2, ["so kind", "so rude"])
    assert kind > rude
    with pytest.raises(ValueError, match="held-out prompt"):
        train_probe(rows[:9], rows[8:], embedder=_KeywordEmbedder())
    assert dialogue_text("\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant:", " d ") == "Human: c?\nAssistant: d"
