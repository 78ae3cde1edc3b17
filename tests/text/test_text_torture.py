"""The crash/resume torture (tests/torture.py) on the text trainer: kills at every injected point -> bit-exact resume
(slow: 15 training subprocesses; `.ci/run` runs it with -m slow)."""
import pytest

from mmalign.testing import tiny_preference_rows, write_jsonl
from tests.torture import KILLS, TRAINING, torture


def _make_config(tiny_model_dir, data):
    def make(output_dir):
        return {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(data)},
            "training": {"batch_size": 4, "learning_rate": 2e-3, "max_prompt_length": 32, "max_response_length": 24,
                         "seed": 0, **TRAINING},
            "output_dir": str(output_dir),
        }

    return make


@pytest.mark.slow
def test_text_resume_after_every_kill_point_is_bit_exact(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_preference_rows(16, seed=7))
    torture("text", _make_config(tiny_model_dir, data), tmp_path, kills=KILLS)
