"""The crash/resume torture (tests/torture.py) on the image trainer: kills at every injected point -> bit-exact resume
(slow: 15 training subprocesses; `.ci/run` runs it with -m slow)."""
import pytest

from tests.torture import KILLS, TRAINING, torture


def _make_config(tiny_sd_path, toy_data):
    def make(output_dir):
        return {
            "output_dir": str(output_dir),
            "model": {"name_or_path": str(tiny_sd_path)},
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "data": {"train": str(toy_data), "resolution": 32},
            "objective": {"name": "dpo", "beta_d": 1000},
            "training": {"batch_size": 2, "learning_rate": 2e-3, "seed": 0, **TRAINING},
        }

    return make


@pytest.mark.slow
def test_image_resume_after_every_kill_point_is_bit_exact(tiny_sd_path, toy_data, tmp_path):
    torture("image", _make_config(tiny_sd_path, toy_data), tmp_path, kills=KILLS)
