"""The crash/resume torture (tests/torture.py) on the online trainer (mmalign.text.online): kills at every injected
point -> bit-exact resume, with two updates per rollout so that kills land while a rollout is open.
(slow: 15 training subprocesses; `.ci/run` runs it with -m slow)."""
import pytest

from mmalign.testing import write_jsonl
from tests.torture import KILLS, TRAINING, torture


@pytest.mark.slow
def test_online_resume_after_every_kill_point_is_bit_exact(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Say hello.", "Pick a number.",
                                                                               "Can you help me?", "Bake bread.")])

    def make(output_dir):
        return {
            "model": {"name_or_path": str(tiny_model_dir)},
            "prompts": {"train": str(prompts)},
            "reward": [{"kind": "regex", "pattern": "e", "count": True}],
            "algorithm": {"name": "rloo", "beta": 0.01, "updates_per_rollout": 2},
            "sampling": {"k": 4, "max_new_tokens": 6, "eval_k": 4},
            "training": {"batch_size": 2, "learning_rate": 3e-2, "lr_scheduler": "constant", "seed": 0, **TRAINING},
            "output_dir": str(output_dir),
        }

    torture("online", make, tmp_path, kills=KILLS)
