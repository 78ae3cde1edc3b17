"""The RNG builder on mIPO's terms: i.i.d. chosen members, and pools re-drawn every epoch (issue #17)."""
import json
import random
from collections import Counter

import pytest

from mmalign.config import load_config
from mmalign.text.config import TextTrainConfig
from mmalign.text.evaluation.uniformity import Interval, parse_first_integer
from mmalign_experiments.rng import RngDataConfig, build_preference_rows, run_rng
from mmalign_experiments.rng.groups import build_pool_rows, draw_chosen


def test_iid_chosen_members_repeat_at_the_rate_of_independent_draws():
    cfg = RngDataConfig(group_size=3, train_gap_min=5, train_gap_max=5, seed=1)  # member_draws: iid by default
    n = 4000
    groups, pairs, _ = build_preference_rows(["p"] * n, [Interval(10, 15)] * n, [[" 10", " 11", " 12"]] * n, cfg)
    with_repeat = sum(len(set(g["chosen"])) < 3 for g in groups) / n
    # three i.i.d. uniform draws of 6 values hold a repeat with probability 1 − (6·5·4)/6³ = 4/9
    assert abs(with_repeat - 4 / 9) < 0.03
    values = Counter(int(c) for g in groups for c in g["chosen"])
    chi2 = sum((count - 3 * n / 6) ** 2 / (3 * n / 6) for count in values.values())
    assert set(values) == set(range(10, 16)) and chi2 < 35
    # the rejected members are answers of the model, the pairs the zipped groups (as before)
    assert all(r in (" 10", " 11", " 12") for g in groups for r in g["rejected"]) and len(pairs) == 3 * n


def test_distinct_draws_never_repeat_and_unknown_mode_is_refused():
    rng = random.Random(0)
    assert all(len(set(draw_chosen(rng, 0, 5, 6, "distinct"))) == 6 for _ in range(50))
    with pytest.raises(ValueError, match="member_draws"):
        draw_chosen(rng, 0, 5, 2, "sorted")


def test_pools_are_ragged_and_pairs_repeat_each_pool_k_times():
    cfg = RngDataConfig(group_size=3, redraw_pool_size=8, seed=2)
    answers = [[" 4", "no idea", " 7 or 8", ""], [" 21"], ["", " "]]
    intervals = [Interval(0, 5), Interval(20, 25), Interval(30, 35)]
    pools, pair_rows, stats = build_pool_rows(["a", "b", "c"], intervals, answers, cfg, lambda v: f" {v}",
                                              parse_first_integer)
    assert stats == {"train_prompts": 2, "skipped_prompts": 1}
    assert pools[0]["rejected"] == [" 4", " 7", "no idea"] and pools[1]["rejected"] == [" 21"]  # ragged
    assert all(len(p["chosen"]) == 8 and all(p["low"] <= int(c) <= p["high"] for c in p["chosen"]) for p in pools)
    assert pair_rows == [pools[0]] * 3 + [pools[1]] * 3


@pytest.mark.parametrize("member_pairs", [True, False])
def test_end_to_end_with_pools_on_the_tiny_model(member_pairs, tiny_model_dir, tmp_path):
    config = {
        "member_pairs": member_pairs,
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "rng"),
        "data": {"num_train_intervals": 4, "num_test_intervals": 2, "group_size": 2, "rejected_pool_size": 5,
                 "redraw_pool_size": 6, "low_max": 100, "train_gap_max": 6, "test_gap_max": 6},
        "sampling": {"num_samples": 4, "max_new_tokens": 3},
        "methods": [{"label": "IPO", "objective": "ipo", "beta": 0.1},
                    {"label": "mIPO", "objective": "mipo", "beta": 0.1}],
        "comparisons": [["mIPO", "IPO"]],
        "training": {"batch_size": 2, "learning_rate": 1e-3, "num_epochs": 2, "progress_bar": False},
    }
    results = run_rng(config)
    out = tmp_path / "rng"
    pools = [json.loads(line) for line in (out / "data/train_groups.jsonl").read_text().splitlines()]
    assert all(len(p["chosen"]) == 6 for p in pools)
    # IPO: the k member pairs of k re-drawn members (objective.pairs: members), or k pool rows of one member each
    for label, members in (("IPO", 2 if member_pairs else 1), ("mIPO", 2)):
        run_cfg = load_config(TextTrainConfig, out / "runs" / label / "final" / "config.yaml")
        assert run_cfg.data.redraw_members == members and run_cfg.data.format == "groups"
        assert run_cfg.objective.hyperparameters.get("pairs") == ("members" if label == "IPO" and member_pairs else None)
        assert run_cfg.training.batch_size == (2 if member_pairs or label == "mIPO" else 4)
    assert set(results["win_rates"]) == {"IPO vs base", "mIPO vs base", "mIPO vs IPO"}
    # both methods ran 2 epochs over the pools: mIPO 2 groups per step, IPO the 2·k pairs of 2 groups or 2·k pair rows
    for label in ("IPO", "mIPO"):
        assert results["training"][label]["global_step"] == 4, results["training"][label]
