"""The two-bias comparison driver (DPO / CNRPO per bias / CNRPO with both triggers): α split, a tiny end-to-end run."""
import json

import pytest

from mmalign.config import ConfigError, load_config
from mmalign_experiments.two_bias_compare import METHODS, TwoBiasCompareConfig, alphas, make_data, rule_table, run_compare
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
    # only_finished tabulates the finished seed and trains nothing for the unfinished one
    again = run_compare({**config, "seeds": [0, 1], "only_finished": True})
    assert again["rows"] == results["rows"] and not (tmp_path / "cmp" / "seed1").exists()
    assert "Verdict by the rule" in (tmp_path / "cmp" / "results.md").read_text()


def _row(method, seed, length, prefix, target, target_se=0.5):
    return {"method": method, "seed": seed, "length_shift": length, "prefix_shift": prefix, "target_shift": target,
            "length_shift_se": 1.0, "prefix_shift_se": 0.4, "target_shift_se": target_se}


def _rows(both_prefix_in_seed2=1.0, both_target=0.0):
    # per seed: DPO learns both biases; each single trigger removes only its own; both triggers remove both
    rows = []
    for s in (0, 1, 2):
        rows += [_row("DPO", s, 20.0, 6.0, 0.5), _row("CNRPO length", s, 4.0, 6.5, 0.4),
                 _row("CNRPO prefix", s, 21.0, 1.0, 0.6),
                 _row("CNRPO both", s, 5.0, both_prefix_in_seed2 if s == 2 else 1.5, both_target)]
    return rows


def test_rule_supported_only_when_every_part_holds_in_every_seed():
    table, verdict = rule_table(_rows())
    assert verdict == "supported"
    assert "| R1 | CNRPO both vs DPO | length (first lower) | 3/3 | -15.00 |" in table
    assert "| R2 | CNRPO both vs CNRPO length | prefix (first lower) | 3/3 |" in table
    # one seed where two triggers leave the prefix bias above DPO's: R1 fails for the prefix only -> partly
    table, verdict = rule_table(_rows(both_prefix_in_seed2=7.0))
    assert verdict == "partly supported" and "| R1 | CNRPO both vs DPO | prefix (first lower) | 2/3 |" in table
    # the target margin lost by more than twice its s.e. (0.5 - 2 * 0.2 > 0.0): R3 fails -> partly
    assert rule_table(_rows(both_target=0.0))[1] == "supported"  # 0.0 >= 0.5 - 2 * 0.5
    rows = [dict(r, target_shift_se=0.2) if r["method"] == "CNRPO both" else r for r in _rows()]
    assert rule_table(rows)[1] == "partly supported"
    # both biases above DPO's in some seed -> not supported; a seed without DPO cannot make R1 hold
    rows = [dict(r, length_shift=30.0, prefix_shift=9.0) if r["method"] == "CNRPO both" and r["seed"] == 0 else r
            for r in _rows()]
    assert rule_table(rows)[1] == "not supported"
    rows = [r for r in _rows() if not (r["method"] == "DPO" and r["seed"] == 1)]
    table, verdict = rule_table(rows)
    assert verdict == "not supported" and "| R1 | CNRPO both vs DPO | length (first lower) | 2/2 |" in table


def test_reuse_results_writes_stored_seeds_as_finished(tmp_path):
    from pathlib import Path

    from mmalign.config import to_dict
    from mmalign_experiments.two_bias_compare import reuse_stored_seeds

    docs = Path(__file__).resolve().parents[2] / "docs" / "bias-robust-two-triggers-results.json"
    cfg = load_config(TwoBiasCompareConfig, {"output_dir": str(tmp_path / "cmp"), "seeds": [0, 1, 2, 3],
                                             "reuse_results": str(docs), "only_finished": True})
    out = tmp_path / "cmp"
    assert reuse_stored_seeds(cfg, out) == [0, 1, 2]  # the stored seeds; seed 3 is left to run
    stored = [r for r in json.loads(docs.read_text())["rows"] if r["seed"] == 1]
    assert json.loads((out / "seed1" / "results.json").read_text()) == stored
    assert not (out / "seed3").exists() and reuse_stored_seeds(cfg, out) == []
    with pytest.raises(ValueError, match="setting anchor_size was 16 there, 32 here"):
        reuse_stored_seeds(load_config(TwoBiasCompareConfig, {**to_dict(cfg), "anchor_size": 32}), tmp_path / "o")
