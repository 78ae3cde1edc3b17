"""Demonstration 2 of the online issue (thesis ch. 2): the per-seed summary, and the driver at toy scale."""

import json

import pytest

from mmalign_experiments.online_divergence import main, summarise


def test_summarise_is_mean_and_sd_over_seeds_per_cell():
    runs = [{"divergence": "js", "placement": "reward", "seed": s, "reward": r, "max_penalty": p}
            for s, r, p in ((0, 1.0, 0.5), (1, 3.0, 1.5))]
    runs.append({"divergence": "js", "placement": "loss", "seed": 0, "reward": 7.0})
    table = {(row["divergence"], row["placement"]): row for row in summarise(runs)}
    reward_cell = table[("js", "reward")]
    assert reward_cell["seeds"] == 2 and reward_cell["reward"] == 2.0 and reward_cell["max_penalty"] == 1.0
    assert reward_cell["reward_sd"] == pytest.approx(2 ** 0.5)
    loss_cell = table[("js", "loss")]
    assert loss_cell["reward"] == 7.0 and loss_cell["reward_sd"] is None and "max_penalty" not in loss_cell


@pytest.mark.slow
def test_driver_reports_every_cell_with_the_penalty_growth_and_a_plot(tmp_path):
    out, plot = tmp_path / "div.json", tmp_path / "frontier.png"
    main(["--seeds", "0", "1", "--steps", "3", "--divergences", "reverse_kl", "forward_kl", "--out", str(out),
          "--plot", str(plot)])
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2 * 2 * 2  # seeds × placements × divergences
    cells = {(row["divergence"], row["placement"]): row for row in result["summary"]}
    assert set(cells) == {(d, p) for d in ("reverse_kl", "forward_kl") for p in ("loss", "reward")}
    for (divergence, placement), row in cells.items():
        assert row["seeds"] == 2 and row["reward_sd"] is not None and row["grad_norm_max"] > 0
        if placement == "reward":
            assert 0 <= row["penalty_first"] <= row["max_penalty"] and row["penalty_last"] <= row["max_penalty"]
        else:
            assert "max_penalty" not in row
    assert plot.stat().st_size > 10_000
