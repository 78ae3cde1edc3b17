"""ECE of the preference prediction, logged during training as eval_ece (thesis §2.6.4)."""
import math

import pytest
import torch

import mmalign.text
from mmalign.engine import read_metrics
from mmalign.shared.metrics import preference_ece
from mmalign.testing import tiny_preference_rows, write_jsonl
from mmalign.text.evaluation.calibration import CalibrationAccumulator, group_scores, member_lengths

from .test_train import run_config


def test_group_scores_are_per_token_means_over_present_members():
    policy = torch.tensor([[-4.0, -9.0], [-6.0, 0.0]])
    index = torch.tensor([[0, 1], [2, -1]])  # second group has one member
    lengths = torch.tensor([2, 3, 3])
    scores = group_scores(policy, index, lengths)
    assert scores.tolist() == pytest.approx([(-2.0 + -3.0) / 2, -2.0])


def test_member_lengths_both_layouts():
    padded = {"loss_mask": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)}
    assert member_lengths(padded).tolist() == [2, 1]
    shared = {"score_members": torch.tensor([0, 0, 1, 2, 2, 2]), "num_members": 4}
    assert member_lengths(shared).tolist() == [2, 1, 3, 0]


def test_accumulator_matches_preference_ece_on_all_batches():
    acc = CalibrationAccumulator(n_bins=5)
    chosen, rejected = [], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        pc, pr = -5 * torch.rand(4, 1, generator=gen), -5 * torch.rand(4, 1, generator=gen)
        batch = {"loss_mask": torch.ones(8, 5, dtype=torch.bool),
                 "chosen_index": torch.arange(0, 8, 2)[:, None], "rejected_index": torch.arange(1, 8, 2)[:, None]}
        acc.add({"policy_chosen": pc, "policy_rejected": pr}, batch)
        chosen += (pc[:, 0] / 5).tolist()
        rejected += (pr[:, 0] / 5).tolist()
    assert acc.compute() == pytest.approx(preference_ece(chosen, rejected, n_bins=5))


@pytest.mark.parametrize("kind", ["pairs", "groups"])
def test_eval_ece_logged_during_training_and_layout_independent(kind, tiny_model_dir, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", tiny_preference_rows(12, kind=kind, seed=3)))
    name = "dpo" if kind == "pairs" else "mipo"
    eces = {}
    for share in ("on", "off"):
        cfg = run_config(tiny_model_dir, data, tmp_path / f"{kind}-{share}", data={"eval": data},
                         objective={"name": name, "beta": 0.1},
                         training={"eval_steps": 2, "share_prompt": share})
        summary = mmalign.text.train(cfg)
        rows = [r for r in read_metrics(summary["metrics_path"]) if "eval_ece" in r]
        assert [r["step"] for r in rows] == [2, 4]
        assert all(0 <= r["eval_ece"] <= 1 and math.isfinite(r["eval_ece"]) for r in rows)
        eces[share] = [r["eval_ece"] for r in rows]
    # the two collator layouts score the same tokens: the same ECE
    assert eces["on"] == pytest.approx(eces["off"], abs=1e-5)
