"""Label noise on the RNG task (thesis §3.6.4): the noisy judge, the majority label of groups, a tiny end-to-end run."""
import json

import pytest

from mmalign.config import ConfigError, load_config
from mmalign_experiments.label_noise import LabelNoiseConfig, Method, methods, noisy_rows, run_label_noise, vote_draws


def _groups(n, k):
    return [{"prompt": f"p{g}", "chosen": [f" c{g}.{i}" for i in range(k)], "rejected": [f" r{g}.{i}" for i in range(k)]}
            for g in range(n)]


def test_member_votes_flip_pairs_at_the_rate_and_majorities_flip_groups_less_often():
    n, rate = 4000, 0.3
    groups, votes = _groups(n, 5), vote_draws(n, 5, seed=0)
    pairs, wrong_pairs = noisy_rows(groups, Method("DPO 5 pairs", 5, False), rate, votes, "member_votes")
    assert len(pairs) == 5 * n and abs(wrong_pairs - rate) < 0.02
    # A flipped pair is exactly its members swapped.
    flipped = next(p for p in pairs if p["flipped"])
    assert flipped["chosen"].startswith(" r") and flipped["rejected"].startswith(" c")
    # Majority of 3 / 5 independent votes wrong: 3p²(1-p) + p³ = 0.216, and 0.163 for k = 5 (Remark 1).
    expected = {1: rate, 3: 0.216, 5: 0.16308}
    for k, want in expected.items():
        rows, wrong = noisy_rows(groups, Method("m", k, k > 1), rate, votes, "member_votes")
        assert len(rows) == (n if k > 1 else n) and abs(wrong - want) < 0.02, (k, wrong)
        if k > 1:
            assert all(len(r["chosen"]) == k for r in rows)
    # A group's label is the majority of the same votes its pairs got.
    rows, _ = noisy_rows(groups, Method("m", 3, True), rate, votes, "member_votes")
    pairs3, _ = noisy_rows(groups, Method("d", 3, False), rate, votes, "member_votes")
    for g in range(50):
        assert rows[g]["flipped"] == (sum(p["flipped"] for p in pairs3[3 * g:3 * g + 3]) >= 2)


def test_group_noise_flips_every_pair_of_a_flipped_group_and_rates_share_random_numbers():
    groups, votes = _groups(2000, 3), vote_draws(2000, 3, seed=1)
    low, wrong_low = noisy_rows(groups, Method("m", 3, True), 0.1, votes, "group")
    high, wrong_high = noisy_rows(groups, Method("m", 3, True), 0.4, votes, "group")
    assert abs(wrong_low - 0.1) < 0.025 and abs(wrong_high - 0.4) < 0.035
    assert all(h["flipped"] for lo, h in zip(low, high) if lo["flipped"])  # monotone coupling across rates
    pairs, _ = noisy_rows(groups, Method("d", 3, False), 0.4, votes, "group")
    for g in range(100):
        assert {p["flipped"] for p in pairs[3 * g:3 * g + 3]} == {high[g]["flipped"]}
    clean, wrong = noisy_rows(groups, Method("d", 3, False), 0.0, votes, "member_votes")
    assert wrong == 0.0 and not any(r["flipped"] for r in clean)


def test_methods_and_config_validation():
    cfg = LabelNoiseConfig()
    assert [m.label for m in methods(cfg)] == ["DPO k=1", "mDPO k=3", "DPO 3 pairs"]
    with pytest.raises(ConfigError, match="noise_rates"):
        load_config(LabelNoiseConfig, {"noise_rates": [0.0, 0.5]})
    with pytest.raises(ConfigError, match="group_sizes"):
        load_config(LabelNoiseConfig, {"group_sizes": [1, 4]})


@pytest.mark.slow  # ~50 s on a quiet box, 4-5 min under load
def test_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    config = {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "ln"), "seeds": [0, 1],
        "noise_rates": [0.0, 0.4], "group_sizes": [1, 2], "pairwise_group_sizes": [2],
        "data": {"num_train_intervals": 4, "num_test_intervals": 2, "group_size": 2, "rejected_pool_size": 4,
                 "low_max": 100, "train_gap_max": 6, "test_gap_max": 6},
        "sampling": {"num_samples": 4, "max_new_tokens": 3},
        "training": {"batch_size": 2, "num_epochs": 1, "progress_bar": False},
    }
    results = run_label_noise(config)
    out = tmp_path / "ln"
    assert (out / "label_noise.png").is_file() and (out / "results.md").is_file()
    rows = results["rows"]
    # 2 seeds x (base + 2 rates x 3 methods)
    assert len(rows) == 2 * (1 + 2 * 3)
    assert {r["method"] for r in rows} == {"base", "DPO k=1", "mDPO k=2", "DPO 2 pairs"}
    assert all(r["wrong_label_rate"] == 0.0 for r in rows if r["rate"] == 0.0)
    saved = json.loads((out / "seed1" / "p0.4" / "mDPO_k2" / "eval.json").read_text())
    assert saved["seed"] == 1 and saved["k"] == 2 and len(saved["entropy_per_interval"]) == 2
    train_rows = [json.loads(line) for line in (out / "seed0" / "p0.4" / "DPO_2_pairs" / "train.jsonl").open()]
    assert len(train_rows) == 2 * 4 and all(isinstance(r["chosen"], str) for r in train_rows)
    # Finished runs are reused: a second call trains nothing and returns the same rows.
    again = run_label_noise(config)
    assert [r["entropy"] for r in again["rows"]] == [r["entropy"] for r in rows]
    # only_finished tabulates what exists without training: drop one run and it is simply missing.
    (out / "seed1" / "p0.4" / "mDPO_k2" / "eval.json").unlink()
    partial = run_label_noise({**config, "only_finished": True})
    assert len(partial["rows"]) == len(rows) - 1
    assert not any(r["seed"] == 1 and r["rate"] == 0.4 and r["method"] == "mDPO k=2" for r in partial["rows"])


def test_seed_comparisons_count_paired_wins():
    from mmalign_experiments.label_noise import seed_comparisons

    rows = [{"method": m, "rate": 0.3, "seed": s, "entropy": e}
            for s, (g, d) in enumerate([(1.2, 1.0), (0.9, 1.0), (1.5, 1.1)]) for m, e in (("mDPO k=3", g), ("DPO k=1", d))]
    table = seed_comparisons(rows, [Method("mDPO k=3", 3, True), Method("DPO k=1", 1, False)], [0.3])
    assert "| mDPO k=3 vs DPO k=1 | 0.3 | 2/3 | +0.167 |" in table


def test_drops_from_clean_are_paired_by_seed():
    from mmalign_experiments.label_noise import drops_from_clean

    rows = [{"method": "DPO k=1", "rate": p, "seed": s, "entropy": e}
            for s, (clean, noisy) in enumerate([(1.0, 0.8), (1.2, 0.9), (1.1, 1.2)]) for p, e in ((0.0, clean), (0.4, noisy))]
    rows.append({"method": "mDPO k=5", "rate": 0.4, "seed": 0, "entropy": 2.0})  # no p = 0 run: not paired
    table = drops_from_clean(rows, ["DPO k=1", "mDPO k=5"], [0.0, 0.4])
    assert "| DPO k=1 | -0.133 ± 0.208 (n=3) |" in table
    assert "| mDPO k=5 | – |" in table
    assert drops_from_clean(rows, ["DPO k=1"], [0.4]) == ""
