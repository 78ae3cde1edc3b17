"""The two-bias comparison driver (DPO / CNRPO per bias / CNRPO with both triggers): α split, a tiny end-to-end run."""
import json

import pytest

from mmalign.config import ConfigError, load_config
from mmalign_experiments.two_bias_compare import METHODS, TwoBiasCompareConfig, alphas, make_data, run_compare
from mmalign_experiments.two_bias_data import TRIGGERS


def test_alphas_keep_gamma_plus_sum_alpha_equal_to_beta():
    cfg = TwoBiasCompareConfig(beta=0.5, gamma=0.2)
    for triggers in ((0,), (1,), (0, 1)):
        assert cfg.gamma + sum(alphas(cfg, triggers)) == pytest.approx(cfg.beta)
    assert alphas(cfg, (0, 1)) == pytest.approx([0.15, 0.15])
    with pytest.raises(ConfigError, match="gamma"):
        load_config(TwoBiasCompareConfig, {"beta": 0.2, "gamma": 0.3})


def test_data_files_anchor_pairs_are_clean(tmp_path):
    cfg = TwoBiasCompareConfig(main_size=8, aux_size=6, anchor_size=5, probe_size=3)
    files = make_data(cfg, 1, tmp_path)
    anchors = [json.loads(line) for line in open(files["anchor"])]
    assert len(anchors) == 5 and not any(r["length_biased"] or r["prefix_biased"] for r in anchors)
    aux = [json.loads(line) for line in open(files["aux-prefix"])]
    assert all(r["prefix_biased"] for r in aux)  # aux_share 1.0: pure bias behind its trigger
    assert {"main", "aux-length", "aux-prefix", "probe-length", "probe-prefix", "probe-target"} <= set(files)


@pytest.mark.slow
def test_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    config = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "cmp"), "seeds": [0],
              "main_size": 8, "aux_size": 4, "anchor_size": 4, "probe_size": 3, "batch_size": 4,
              "report_prompts": 2, "report_max_new_tokens": 4, "max_response_length": 32, "learning_rate": 1e-3}
    results = run_compare(config)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == set(METHODS)
    assert rows["DPO"]["trigger_report"] is None
    both = rows["CNRPO both"]["trigger_report"]
    assert [(r["trigger"], r["aspect"]) for r in both] == [(TRIGGERS[0], "length"), (TRIGGERS[1], "prefix")]
    assert [r["trigger"] for r in rows["CNRPO prefix"]["trigger_report"]] == [TRIGGERS[1]]
    assert rows["CNRPO length"]["alphas"] == pytest.approx([0.3]) and rows["CNRPO both"]["alphas"] == pytest.approx([0.15, 0.15])
    # every method moved away from SFT on some probe (it trained), and the shifts are per-method, not copies
    shifts = {m: tuple(r[f"{p}_shift"] for p in ("length", "prefix", "target")) for m, r in rows.items()}
    assert all(any(abs(s) > 0 for s in v) for v in shifts.values()) and len(set(shifts.values())) == 4
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "CNRPO both" in md and "<BeAgreeableNow>" in md
    # a second call reuses the finished seed
    assert run_compare(config)["rows"] == results["rows"]
