"""The CNRPO bandit check (SPEC §4, cnrpo §6.1 Figure 1) on a reduced grid; see docs/bandit.md for the findings."""

import csv
import json

import numpy as np
import pytest
import torch

from mmalign_experiments.sim.bandit import BanditConfig, bandit_rewards, main, run_bandit

# 300 epochs with the cosine schedule land within 3e-6 (TV) of the 1000-epoch result on the full grid.
EPSILONS = [0.0, 0.5, 0.9]
ALPHAS = [0.0, 0.15, 0.27]  # 0, 0.5β, 0.9β
TOL_NO_NOISE = 1e-4  # |δ_DPO − δ_CNRPO| at ε = 0, in total variation


@pytest.fixture(scope="module")
def grid():
    torch.set_num_threads(1)
    result, log = run_bandit(BanditConfig(epsilons=EPSILONS, alphas=ALPHAS, epochs=300))
    return result, log


def test_paper_shape_against_each_methods_own_optimum(grid):
    result, _ = grid
    adv = result.advantage("own")  # [alpha, epsilon]
    # Without noise there is nothing to choose between the two, for every α.
    assert np.abs(adv[:, 0]).max() < TOL_NO_NOISE
    # With bias aversion (α = 0.5β, 0.9β): positive, growing with ε ...
    for a in (1, 2):
        assert 0 < adv[a, 1] < adv[a, 2]
    # ... and with α at high noise.
    assert 0 < adv[1, 2] < adv[2, 2]
    # Documented finding: with α = 0 CNRPO (γ = 0.2 < β) is *more* noise-sensitive than DPO.
    assert adv[0, 2] < -0.1


def test_shared_target_finding(grid):
    """Against one target π*_β for both, CNRPO already loses without noise (γ ≠ β and the α pull)."""
    result, _ = grid
    adv = result.advantage("shared")
    assert (adv[:, 0] < -0.03).all()
    assert adv[2, 2] > 0.1  # but it wins clearly at ε = 0.9 with α = 0.9β


def test_converged_policies_match_closed_forms(grid):
    result, log = grid
    r_true, r_bias = bandit_rewards(20)
    # Stage 1 is DPO on an exact Bradley–Terry preference: π_φ ∝ π_ref exp(r^b / β).
    expected_bias = torch.log_softmax(r_bias / 0.3, dim=0).numpy()
    np.testing.assert_allclose(result.log_bias_policy, expected_bias, atol=1e-5)
    # Clean-data DPO reaches π*_β; CNRPO reaches Theorem 1's π_ref^{β/γ} π_φ^{−α/γ} exp(r*/γ).
    assert result.delta_dpo["own"][0] < 1e-5
    assert result.delta_cnrpo["own"][:, 0].max() < 1e-5
    assert result.max_grad_norm < 1e-6
    assert log[-1]["epoch"] == 299


def test_cnrpo_with_gamma_beta_and_no_alpha_is_dpo():
    result, _ = run_bandit(BanditConfig(epsilons=[0.0, 0.6], alphas=[0.0], gamma=0.3, epochs=60))
    np.testing.assert_allclose(result.log_cnrpo[0], result.log_dpo, atol=1e-10)


def test_rewards_follow_the_spec():
    r_true, r_bias = bandit_rewards(20)
    norm = np.exp(np.arange(1, 21)).sum()
    assert r_true[0].item() == pytest.approx(np.exp(19) / norm)  # r*(a_1) = exp(n − 1) / Σ exp(j)
    assert r_bias[-1].item() == pytest.approx(np.exp(20) / norm)
    assert (torch.diff(r_true) < 0).all() and (torch.diff(r_bias) > 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"epsilons": [1.0]}, r"\[0, 1\)"), ({"alphas": []}, "at least one"), ({"epochs": 0}, "epochs"),
     ({"gamma": 0.0}, "gamma"), ({"bias_mix": 0.0}, "bias_mix")],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BanditConfig(**kwargs)


def test_cli_writes_table_csv_heatmap_and_summary(tmp_path, capsys):
    out = tmp_path / "bandit"
    assert main(["--out", str(out), "--epsilons", "0", "0.8", "--alphas", "0", "0.2", "--epochs", "20"]) == 0
    printed = capsys.readouterr().out
    assert "δ_DPO − δ_CNRPO (tv, target=own)" in printed
    with open(out / "bandit_grid.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {"epsilon", "alpha", "advantage_own", "advantage_shared"} <= set(rows[0])
    assert (out / "bandit_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["epochs"] == 20 and len(summary["advantage"]["own"]) == 2
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 1


def test_cli_help_and_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "epsilons" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("epsilon: [0.1]\n")
    with pytest.raises(SystemExit) as exit_info:  # the shared CLI: usage + the error, exit status 2
        main(["--config", str(bad), "--out", str(tmp_path / "x"), "--quiet"])
    assert exit_info.value.code == 2 and "bad.yaml: epsilon: unknown key" in capsys.readouterr().err
