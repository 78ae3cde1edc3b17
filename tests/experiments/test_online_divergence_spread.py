"""Demonstration 2b at another β: the in-loss cells' spread per seed and its paired comparison with a stored run."""
import json

import pytest

from mmalign_experiments import online_divergence_spread as spread


def _runs(seed, rewards, placement="loss"):
    names = ("reverse_kl", "js", "forward_kl", "alpha=0.5")
    return [{"divergence": d, "placement": placement, "seed": seed, "reward": r, "entropy": 0.2, "distinct_2": 0.4,
             "self_bleu": 0.7, "reverse_kl": 1.0 + r} for d, r in zip(names, rewards)]


def test_spread_is_max_minus_min_over_the_four_in_loss_cells_of_a_seed():
    runs = _runs(0, (1.0, 1.5, 1.2, 1.1)) + _runs(1, (2.0, 2.1, 2.0, 2.05)) + _runs(2, (1.0, 9.0, 1.0))
    runs += _runs(0, (50.0, 0.0, 0.0, 0.0), placement="reward")  # in-reward cells are not counted
    result = spread.spread_per_seed(runs)
    assert result["reward"] == pytest.approx({0: 0.5, 1: 0.1})  # seed 2 misses a cell: left out
    assert result["entropy"] == {0: 0.0, 1: 0.0}


def test_compare_spread_grew_only_when_larger_in_every_seed():
    stored = _runs(0, (1.0, 1.1, 1.0, 1.0)) + _runs(1, (1.0, 1.2, 1.0, 1.0))
    wider = _runs(0, (1.0, 1.3, 1.0, 1.0)) + _runs(1, (1.0, 1.5, 1.0, 1.0))
    result = spread.compare_spread(wider, stored)
    assert result["reward"]["verdict"] == "grew" and result["reward"]["seeds"] == [0, 1]
    assert result["reward"]["spread"] == pytest.approx([0.3, 0.5])
    assert result["entropy"]["verdict"] == "not resolved"  # equal spreads: neither grew nor shrank
    assert spread.compare_spread(stored, wider)["reward"]["verdict"] == "shrank"
    mixed = _runs(0, (1.0, 1.3, 1.0, 1.0)) + _runs(1, (1.0, 1.1, 1.0, 1.0))
    assert spread.compare_spread(mixed, stored)["reward"]["verdict"] == "not resolved"
    assert spread.compare_spread(wider, _runs(2, (1, 1, 1, 1)))["reward"]["verdict"] == "no common seed"
    table = spread.markdown(result, 0.2, 0.05).splitlines()
    assert table[0] == "| metric | spread at β = 0.2 (per seed) | at β = 0.05 | verdict |"
    assert table[2] == "| reward | 0.3, 0.5 | 0.1, 0.2 | grew |"


def test_a_stored_run_must_differ_in_beta_only(tmp_path):
    settings = {"model": "m", "steps": 5, "beta": 0.2}
    path = tmp_path / "stored.json"
    path.write_text(json.dumps({"settings": {**settings, "beta": 0.05}, "runs": _runs(0, (1, 2, 3, 4))}))
    runs, beta = spread.stored_runs(path, settings)
    assert beta == 0.05 and len(runs) == 4
    with pytest.raises(SystemExit, match="more than beta"):
        spread.stored_runs(path, {**settings, "steps": 10})
