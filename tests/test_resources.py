"""Shipped configs and the experiments' data folder: nothing is read relative to the source tree."""
import pytest

from mmalign.resources import CONFIGS_DIR, data_dir, shipped_config


def test_the_main_job_config_ships_inside_the_package():
    path = shipped_config("text/rng-quickstart.yaml")
    assert path.is_file() and path.parent.parent == CONFIGS_DIR
    assert CONFIGS_DIR.parent.name == "mmalign"
    from mmalign_experiments.rng import QUICKSTART_CONFIG, RngConfig
    from mmalign.config import load_config

    assert QUICKSTART_CONFIG == path
    assert load_config(RngConfig, QUICKSTART_CONFIG).model == "smollm2"


def test_the_data_folder_is_a_setting_defaulting_to_shared_data_from_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MMALIGN_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir().resolve() == (tmp_path / ".." / "shared" / "data").resolve()
    monkeypatch.setenv("MMALIGN_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data_dir() == tmp_path / "elsewhere"


def test_missing_experiment_data_is_a_clear_error(monkeypatch, tmp_path):
    from mmalign.image.face_model.prompts import load_occupations
    from mmalign.image.fairface import load_fairface

    for name in ("MMALIGN_FAIRFACE_DIR", "MMALIGN_WINOGENERATED_OCCUPATIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MMALIGN_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/winogenerated/winogenerated_occupations.jsonl.*MMALIGN_DATA_DIR"):
        load_occupations()
    with pytest.raises(FileNotFoundError, match=r"nowhere/fairface32/train.npz does not exist.*MMALIGN_DATA_DIR"):
        load_fairface("train")


def test_the_experiments_data_is_found_through_the_setting(monkeypatch, tmp_path):
    from mmalign.image.face_model.prompts import load_occupations

    folder = tmp_path / "data" / "winogenerated"
    folder.mkdir(parents=True)
    (folder / "winogenerated_occupations.jsonl").write_text(
        '{"occupation": "nurse", "BLS_original_occupation": "Registered nurses", "BLS_percent_women_2019": 88.9}\n')
    monkeypatch.delenv("MMALIGN_WINOGENERATED_OCCUPATIONS", raising=False)
    monkeypatch.setenv("MMALIGN_DATA_DIR", str(tmp_path / "data"))
    assert [o.name for o in load_occupations()] == ["nurse"]
