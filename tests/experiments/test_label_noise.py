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


def test_an_even_group_breaks_ties_by_a_coin_so_its_label_error_equals_the_odd_size_below():
    from mmalign_experiments.label_noise_trend import expected_label_error

    assert [round(expected_label_error(k, 0.3), 3) for k in (1, 2, 3, 4, 5)] == [0.3, 0.3, 0.216, 0.216, 0.163]
    n = 6000
    groups, votes = _groups(n, 5), vote_draws(n, 5, seed=2)
    for k in (2, 4):
        rows, wrong = noisy_rows(groups, Method("m", k, True), 0.3, votes, "member_votes")
        assert all(len(r["chosen"]) == k for r in rows) and abs(wrong - expected_label_error(k, 0.3)) < 0.02, (k, wrong)


def _curve_rows(curves, rate=0.3):
    return [{"method": "DPO k=1" if k == 1 else f"mDPO k={k}", "k": k, "rate": rate, "seed": s, "entropy": e,
             "wrong_label_rate": 0.1} for s, curve in enumerate(curves) for k, e in zip((1, 2, 3, 4, 5), curve)]


def test_k_trend_slopes_shapes_and_verdict():
    from mmalign_experiments.label_noise_trend import k_trend, shape

    assert shape([1, 2, 3, 4, 5], [0.7, 1.2, 1.25, 1.3, 1.3]) == "step at k = 1→2"
    assert shape([1, 2, 3, 4, 5], [1.0, 1.1, 1.2, 1.3, 1.4]) == "steady rise"
    assert shape([1, 2, 3, 4, 5], [1.0, 1.2, 1.1, 1.3, 1.4]) == "uneven rise"
    assert shape([1, 2, 3], [1.0, 1.5, 0.9]) == "no rise"
    rising = [[1.0, 1.1, 1.2, 1.3, 1.4], [0.7, 1.2, 1.25, 1.3, 1.3]]
    md, out = k_trend(_curve_rows(rising) + [{"method": "DPO 5 pairs", "k": 5, "rate": 0.3, "seed": 0,
                                                "entropy": 9.0, "wrong_label_rate": 0.3}], [0.3])
    assert out["0.3"]["verdict"] == "supported" and out["0.3"]["slopes"][0] == pytest.approx(0.1)
    assert "| 0 | 1.000 | 1.100 | 1.200 | 1.300 | 1.400 | +0.1000 | steady rise |" in md
    assert "| 2 | 0.300 | 0.100, 0.100 |" in md and "**supported**" in md
    _, out = k_trend(_curve_rows(rising + [[1.4, 1.3, 1.2, 1.1, 1.0]]), [0.3])
    assert out["0.3"]["verdict"] == "not supported"
    # a seed without its whole curve: stated for the complete seeds only; fewer than three k: no section
    partial = _curve_rows(rising) + [r for r in _curve_rows([[], [], [1.0, 1.1, 1.2, 1.3, 1.4]]) if r["k"] != 4]
    _, out = k_trend(partial, [0.3])
    assert out["0.3"]["seeds"] == [0, 1] and "incomplete" in out["0.3"]["verdict"]
    assert k_trend([r for r in _curve_rows(rising) if r["k"] < 3], [0.3]) == ("", {})


def test_reuse_results_writes_stored_runs_as_finished_and_refuses_other_settings(tmp_path):
    from mmalign.config import to_dict
    from mmalign_experiments.label_noise import reuse_stored_runs

    cfg = load_config(LabelNoiseConfig, {"model": "/nowhere", "data": {"group_size": 5}, "noise_rates": [0.3],
                                         "group_sizes": [5, 3, 1], "pairwise_group_sizes": [5], "seeds": [0, 1, 2]})
    rows = [{"method": "base", "seed": 0, "rate": None, "k": 0, "entropy": 0.7, "wrong_label_rate": None,
             "out_of_range_rate": 0.7, "normalized_entropy": 0.3}]
    rows += [{**r, "out_of_range_rate": 0.2, "normalized_entropy": 0.5} for r in _curve_rows([[0.7, 1, 1.2, 1, 1.3]])
             if r["k"] in (1, 3, 5)]
    rows += [{**rows[1], "rate": 0.1}, {**rows[1], "seed": 4}]  # another rate, another seed: not written
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"rows": rows, "config": {**to_dict(cfg), "seeds": [0, 4], "output_dir": "x"}}))
    new = load_config(LabelNoiseConfig, {**to_dict(cfg), "group_sizes": [4, 2, 5, 3, 1], "seeds": [0],
                                         "output_dir": str(tmp_path / "ln"), "reuse_results": str(stored),
                                         "only_finished": True})
    out = tmp_path / "ln"
    assert reuse_stored_runs(new, out) == 4
    assert json.loads((out / "seed0" / "p0.3" / "mDPO_k3" / "eval.json").read_text())["entropy"] == 1.2
    assert (out / "seed0" / "base.json").is_file() and not (out / "seed0" / "p0.1").exists()
    assert reuse_stored_runs(new, out) == 0  # never overwrites a finished run
    # the stored runs tabulate as this sweep's, nothing trained (the k = 2, 4 runs are simply missing)
    results = run_label_noise(new)
    assert len(results["rows"]) == 4 and results["k_trend"]["0.3"]["ks"] == [1, 3, 5]
    with pytest.raises(ValueError, match="setting beta was 0.1 there, 0.2 here"):
        reuse_stored_runs(load_config(LabelNoiseConfig, {**to_dict(new), "beta": 0.2}), tmp_path / "other")


def test_the_stored_sweep_b_is_accepted_with_its_settings():
    from pathlib import Path

    from mmalign_experiments.label_noise import REUSE_IGNORE
    from mmalign_experiments.sweep import stored_rows

    docs = Path(__file__).resolve().parents[2] / "docs" / "label-noise-b-results.json"
    cfg = load_config(LabelNoiseConfig, {"data": {"group_size": 5}, "group_sizes": [4, 2], "pairwise_group_sizes": [],
                                         "noise_rates": [0.3]})
    rows = stored_rows(docs, cfg, REUSE_IGNORE)
    assert {(r["method"], r["seed"]) for r in rows if r["rate"] == 0.3} >= {("mDPO k=5", s) for s in (0, 1, 2)}


def test_noise_contrast_steps_slopes_and_verdicts():
    from mmalign_experiments.label_noise_trend import noise_contrast

    clean = [[1.0, 1.1, 1.2, 1.3, 1.4], [0.9, 1.0, 1.1, 1.2, 1.3]]
    noisy = [[0.7, 1.2, 1.25, 1.3, 1.3], [0.6, 1.0, 1.1, 1.2, 1.3]]
    rows = _curve_rows(clean, rate=0.0) + _curve_rows(noisy)
    md, out = noise_contrast(rows, 0.3)
    s0 = out["per_seed"][0]
    assert s0["S0"] == pytest.approx(0.1) and s0["Sp"] == pytest.approx(0.5) and s0["delta"] == pytest.approx(0.4)
    assert s0["D"] == pytest.approx(s0["slopep"] - 0.1) and s0["noise_effect"][1] == pytest.approx(-0.3)
    assert out["step_verdict"] == "both" and out["curve_verdict"] == "steeper with noise"
    assert "**both**" in md and "| 1 | -0.300, -0.300 | -0.300 |" in md
    # the same step at both rates: group size; a flat clean step and a noisy one: noise; neither: not resolved
    assert noise_contrast(_curve_rows(clean, 0.0) + _curve_rows(clean), 0.3)[1]["step_verdict"] == "group-size effect"
    flat = [[1.0, 1.0, 1.2, 1.3, 1.4], [1.0, 0.9, 1.1, 1.2, 1.3]]
    assert noise_contrast(_curve_rows(flat, 0.0) + _curve_rows(noisy), 0.3)[1]["step_verdict"] == "noise effect"
    _, out = noise_contrast(_curve_rows(flat, 0.0) + _curve_rows(flat), 0.3)
    assert out["step_verdict"] == "not resolved" and out["curve_verdict"] == "not steeper"
    # a seed missing k = 4 at p = 0: stated; without k = 2 at both rates: no section
    _, out = noise_contrast([r for r in rows if not (r["seed"] == 1 and r["k"] == 4 and r["rate"] == 0.0)], 0.3)
    assert out["seeds"] == [0] and out["missing_seeds"] == [1]
    assert noise_contrast([r for r in rows if r["k"] != 2], 0.3) == ("", {})


def test_plot_k_curves_writes_a_png_and_trend_report_contrasts_the_rates(tmp_path):
    from mmalign_experiments.label_noise_trend import plot_k_curves, trend_report

    rows = _curve_rows([[1.0, 1.1, 1.2, 1.3, 1.4], [0.9, 1.0, 1.1, 1.2, 1.3]], 0.0) + _curve_rows(
        [[0.7, 1.2, 1.25, 1.3, 1.3], [0.6, 1.0, 1.1, 1.2, 1.3]])
    path = plot_k_curves(tmp_path / "k.png", rows, [0.0, 0.3])
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_k_curves(tmp_path / "none.png", rows, [0.1]) is None
    md, trend, contrast = trend_report(rows, [0.0, 0.3], tmp_path / "r.png")
    assert set(trend) == {"0.0", "0.3"} and contrast["0.3"]["step_verdict"] == "both" and (tmp_path / "r.png").is_file()
