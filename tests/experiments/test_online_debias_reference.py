"""Demonstration 3 with ``reference: previous``: the option reaches the cells' settings and folders, the stored
run's cells are taken instead of recomputed, and the paired per-seed rule on hand-made cells."""
import json
from types import SimpleNamespace

import pytest

from mmalign_experiments import online_debias, online_debias_reference


def _args(**changes):
    base = dict(rounds=2, k=4, steps_per_round=1, occupations=10, images_per_occupation=2, quality_images=0, set=[])
    return SimpleNamespace(**{**base, **changes})


def _online(seed, genders, races, kind="online"):
    rounds = [{"round": r, "simpson_gender": g, "simpson_race": x, "no_face_rate": 0.0, "denoising_loss": 0.05}
              for r, (g, x) in enumerate(zip(genders, races))]
    return {"kind": kind, "seed": seed, "rounds": rounds, "base": rounds[0], "final": rounds[-1],
            "generated_images": 8}


def _offline(seed, gender, race):
    base = {"simpson_gender": 0.3, "simpson_race": 0.4}
    return {"kind": "offline", "seed": seed, "base": base, "generated_images": 9,
            "final": {"simpson_gender": gender, "simpson_race": race, "no_face_rate": 0.0, "denoising_loss": 0.06}}


def test_the_default_reference_keeps_the_stored_settings_and_folders():
    assert "reference" not in online_debias.settings(_args())
    assert "reference" not in online_debias.settings(_args(reference="initial"))
    assert online_debias.settings(_args(reference="previous"))["reference"] == "previous"
    assert online_debias.cell_name("online", 2, _args()) == "online-seed2"
    assert online_debias.cell_name("online", 2, _args(reference="previous")) == "online-reference-previous-seed2"
    assert online_debias.cell_name("offline", 2, _args(reference="previous")) == "offline-seed2"


def test_a_previous_reference_cell_is_its_own_cell(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(online_debias, "online_cell", lambda args, seed, cell_dir: calls.append(cell_dir.name) or {})
    online_debias.cell(("online", 1, str(tmp_path), _args()))
    online_debias.cell(("online", 1, str(tmp_path), _args(reference="previous")))
    online_debias.cell(("online", 1, str(tmp_path), _args(reference="previous")))  # reused
    assert calls == ["online-seed1", "online-reference-previous-seed1"]


def test_previous_minus_initial_per_round_and_the_rule():
    initial = [_online(s, (0.3, 0.4, g), (0.4, 0.5, r)) for s, g, r in ((0, 0.40, 0.50), (1, 0.30, 0.45), (2, 0.35, 0.5))]
    previous = [_online(s, (0.3, 0.4, g), (0.4, 0.5, r)) for s, g, r in ((2, 0.45, 0.4), (0, 0.42, 0.55), (1, 0.31, 0.40))]
    previous[0]["rounds"][1]["simpson_gender"] = 0.41  # seed 2's first round differs from the stored run's
    result = online_debias_reference.paired_by_round(previous, initial)
    gender, race = result["simpson_gender"], result["simpson_race"]
    assert result["seeds"] == [0, 1, 2] and gender["last_round"] == 2
    assert gender["previous_minus_initial_per_round"][2] == pytest.approx([0.02, 0.01, 0.10])
    assert gender["previous_minus_initial_per_round"][1] == pytest.approx([0.0, 0.0, 0.01])
    assert gender["verdict"] == "previous above initial" and gender["mean"] == pytest.approx(0.13 / 3)
    assert race["previous_minus_initial_per_round"][2] == pytest.approx([0.05, -0.05, -0.10])
    assert race["verdict"] == "not resolved"
    equal = result["round1_equal"]
    assert equal[0]["equal"] and equal[1]["equal"] and not equal[2]["equal"]
    assert equal[2]["differing"] == {"simpson_gender": [0.41, 0.4]}
    # seeds are paired: a seed the stored run lacks is left out
    assert online_debias_reference.paired_by_round(previous, initial[:2])["seeds"] == [0, 1]


def _stored(tmp_path, args):
    stored = {"settings": online_debias.settings(args),
              "cells": [_online(s, (0.3, 0.35, 0.4), (0.4, 0.45, 0.5)) for s in (0, 1)]
              + [_offline(s, 0.38, 0.47) for s in (0, 1)]}
    path = tmp_path / "stored.json"
    path.write_text(json.dumps(stored))
    return path


def test_compare_with_takes_the_stored_cells_and_refuses_other_settings(tmp_path, monkeypatch):
    ran = []

    def fake(args, seed, cell_dir):
        ran.append((args.reference, seed))
        return _online(seed, (0.3, 0.35, 0.45 + seed / 100), (0.4, 0.45, 0.48))

    monkeypatch.setattr(online_debias, "online_cell", fake)
    monkeypatch.setattr(online_debias, "offline_cell", lambda *a: pytest.fail("an offline cell was recomputed"))
    stored = _stored(tmp_path, _args())
    common = ["--seeds", "0", "1", "--rounds", "2", "--steps-per-round", "1", "--occupations", "10",
              "--images-per-occupation", "2", "--quality-images", "0", "--kinds", "online", "--work", str(tmp_path / "w"),
              "--compare-with", str(stored), "--plot", str(tmp_path / "p.png")]
    out = tmp_path / "previous.json"
    assert online_debias.main(common + ["--reference", "previous", "--out", str(out)]) == 0
    assert ran == [("previous", 0), ("previous", 1)]
    result = json.loads(out.read_text())
    assert result["settings"]["reference"] == "previous" and result["compared_with"] == str(stored)
    comparison = result["reference_comparison"]["previous_vs_initial"]
    assert comparison["simpson_gender"]["previous_minus_initial_per_round"][2] == pytest.approx([0.05, 0.06])
    assert comparison["simpson_gender"]["verdict"] == "previous above initial"
    assert comparison["round1_equal"]["0"]["equal"]
    offline = result["comparison"]["simpson_gender"]  # the driver's rule, against the stored offline cells
    assert offline["seeds"] == [0, 1] and offline["online_minus_offline"] == pytest.approx([0.07, 0.08])
    assert "| online, reference previous, round 2 | 0.455 (0.450, 0.460) |" in result["reference_comparison"]["table"]
    assert (tmp_path / "p.png").is_file()
    with pytest.raises(SystemExit, match="only the reference may differ"):
        online_debias.main(common + ["--reference", "previous", "--k", "6", "--out", str(out)])
    with pytest.raises(SystemExit):  # --compare-with needs the other reference
        online_debias.main(common + ["--out", str(out)])


@pytest.mark.slow
def test_previous_reference_end_to_end_repeats_the_initial_first_round(tmp_path):
    """The shipped face model at toy settings: the initial-reference run, then the previous-reference run compared
    with it; round 1 (the starting model is the reference either way) must come out equal."""
    common = ["--seeds", "0", "--rounds", "2", "--k", "4", "--steps-per-round", "2", "--occupations", "10",
              "--images-per-occupation", "2", "--quality-images", "4", "--kinds", "online",
              "--set", "sampling.num_inference_steps=4", "--set", "training.batch_size=2",
              "--set", f"cache_dir={tmp_path / 'cache'}", "--work", str(tmp_path / "work"),
              "--plot", str(tmp_path / "plot.png")]
    initial = tmp_path / "initial.json"
    assert online_debias.main(common + ["--out", str(initial)]) == 0
    out = tmp_path / "previous.json"
    assert online_debias.main(common + ["--reference", "previous", "--compare-with", str(initial), "--out", str(out)]) == 0
    comparison = json.loads(out.read_text())["reference_comparison"]["previous_vs_initial"]
    assert comparison["seeds"] == [0] and comparison["round1_equal"]["0"] == {"compared": True, "equal": True,
                                                                             "differing": {}}
    assert (tmp_path / "work" / "online-reference-previous-seed0" / "rounds" / "round-02" / "policy.safetensors").is_file()
