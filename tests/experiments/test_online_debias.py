"""Demonstration 3 (online vs offline debiasing): the analysis rule on hand-made cells, cell reuse, and the driver
end to end on the shipped face model at toy settings."""
import json
from types import SimpleNamespace

import pytest

from mmalign_experiments import online_debias


def _cell(kind, seed, gender, race, base=(0.3, 0.4), rounds=None):
    out = {"kind": kind, "seed": seed, "generated_images": 10,
           "base": {"simpson_gender": base[0], "simpson_race": base[1]},
           "final": {"simpson_gender": gender, "simpson_race": race}}
    if kind == "online":
        out["rounds"] = rounds or [{"round": 0, **out["base"]}, {"round": 1, **out["final"]}]
    return out


def test_the_rule_needs_every_seed_on_one_side():
    online = [_cell("online", s, g, r) for s, g, r in ((0, 0.40, 0.50), (1, 0.42, 0.45), (2, 0.41, 0.52))]
    offline = [_cell("offline", s, g, r) for s, g, r in ((0, 0.35, 0.48), (1, 0.40, 0.47), (2, 0.38, 0.55))]
    result = online_debias.compare(online, offline)
    gender, race = result["simpson_gender"], result["simpson_race"]
    assert gender["online_minus_offline"] == pytest.approx([0.05, 0.02, 0.03])
    assert gender["mean"] == pytest.approx(0.1 / 3) and gender["verdict"] == "online beats offline"
    assert race["online_minus_offline"] == pytest.approx([0.02, -0.02, -0.03])
    assert race["verdict"] == "not resolved"  # mean < 0 but seed 0 disagrees
    assert gender["online_vs_base"] == gender["offline_vs_base"] == "above base"
    flipped = online_debias.compare(offline, online)["simpson_gender"]
    assert flipped["verdict"] == "offline beats online"
    # seeds are paired: a seed missing on one side is left out, not mismatched
    partial = online_debias.compare(online, offline[:2])["simpson_gender"]
    assert partial["seeds"] == [0, 1] and len(partial["online_minus_offline"]) == 2


def test_summary_gives_mean_and_sd_per_round_over_seeds():
    rows = lambda g: [{"round": 0, "simpson_gender": 0.3}, {"round": 1, "simpson_gender": g}]  # noqa: E731
    online = [_cell("online", s, g, 0.5, rounds=rows(g)) for s, g in ((0, 0.4), (1, 0.5))]
    summary = online_debias.summarise(online, [_cell("offline", 0, 0.45, 0.5)])
    first = summary["online_per_round"][1]["simpson_gender"]
    assert first["mean"] == pytest.approx(0.45) and first["sd"] == pytest.approx(0.0707107, abs=1e-6)
    assert summary["online_per_round"][0]["simpson_gender"]["sd"] == 0.0
    assert summary["offline_final"]["simpson_gender"]["values"] == [0.45]
    assert summary["online_per_round"][1]["no_face_rate"]["mean"] is None  # not measured: not invented
    table = online_debias.markdown(summary)
    assert "| online, after round 1 | 0.450 ± 0.071 (0.400, 0.500) |" in table
    assert "| offline, at its end | 0.450 (0.450) |" in table


def _args(**changes):
    base = dict(rounds=2, k=4, steps_per_round=1, occupations=10, images_per_occupation=2, quality_images=0, set=[])
    return SimpleNamespace(**{**base, **changes})


def test_a_finished_cell_is_reused_only_under_the_same_settings(tmp_path, monkeypatch):
    calls = []

    def fake(args, seed, cell_dir):
        calls.append(seed)
        return {"final": {"simpson_gender": 0.4}}

    monkeypatch.setattr(online_debias, "online_cell", fake)
    first = online_debias.cell(("online", 3, str(tmp_path), _args()))
    again = online_debias.cell(("online", 3, str(tmp_path), _args()))
    assert calls == [3] and again == first and first["settings"]["k"] == 4
    online_debias.cell(("online", 3, str(tmp_path), _args(k=6)))
    assert calls == [3, 3]


@pytest.mark.slow
def test_driver_end_to_end_on_the_shipped_face_model(tmp_path):
    out, plot = tmp_path / "result.json", tmp_path / "plot.png"
    argv = ["--seeds", "0", "--rounds", "2", "--k", "4", "--steps-per-round", "1", "--occupations", "10",
            "--images-per-occupation", "2", "--quality-images", "4", "--set", "groups.rejected_per_group=2",
            "--set", "sampling.num_inference_steps=4", "--set", "training.batch_size=2",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--work", str(tmp_path / "work"), "--out", str(out),
            "--plot", str(plot)]
    assert online_debias.main(argv) == 0
    result = json.loads(out.read_text())
    online, offline = (next(c for c in result["cells"] if c["kind"] == kind) for kind in ("online", "offline"))
    assert [r["round"] for r in online["rounds"]] == [0, 1, 2] and plot.is_file()
    assert online["generated_images"] == 2 * 4 * 8  # rounds × k × training occupations (10 → 8 / 2)
    groups = offline["groups"]
    assert offline["generated_images"] == groups["candidates_classified"] + 8 * 2
    # round 0 of the online run is the base model of the offline run: the same images, the same measurement
    for key in online_debias.ATTRIBUTES:
        assert online["rounds"][0][key] == offline["base"][key]
        assert 0 <= online["rounds"][-1][key] <= 2 / 3
    assert result["comparison"]["simpson_gender"]["verdict"] in (
        "online beats offline", "offline beats online", "not resolved")
    # the offline run trained rounds × steps_per_round steps, each online round steps_per_round
    assert json.loads((tmp_path / "work" / "offline-seed0" / "report.json").read_text())["training"]["mdpo"]["step"] == 2
    assert [r["global_step"] for r in online["rounds"][1:]] == [1, 1]
    stamp = (tmp_path / "work" / "online-seed0" / "cell.json").stat().st_mtime_ns
    assert online_debias.main(argv) == 0  # a re-run reuses both finished cells
    assert (tmp_path / "work" / "online-seed0" / "cell.json").stat().st_mtime_ns == stamp
