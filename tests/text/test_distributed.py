"""Two processes (torchrun, gloo on CPU): data sharded, one metrics log, exact resume mid logging window."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from mmalign.engine import read_metrics
from mmalign.testing import tiny_preference_rows, write_jsonl


@pytest.mark.slow
def test_two_process_training_and_exact_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", tiny_preference_rows(16, kind="groups"))
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(data)},
        "objective": {"name": "mdpo", "beta": 0.1},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"batch_size": 2, "max_steps": 6, "logging_steps": 2, "save_steps": 3, "learning_rate": 1e-3,
                     "progress_bar": False, "plot": False, "num_threads": 1, "save_total_limit": None},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmalign.text.train",
                "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(torchrun, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("done: 6 steps") == 1  # one summary, from the main process
    full = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # 16 groups / (2 per process x 2 processes) = 4 batches per process per epoch: 6 steps = 1.5 epochs
    assert [r["epoch"] for r in full] == [0.5, 1.0, 1.5]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3" / "rng_state_1.safetensors").exists()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-6")
    again = subprocess.run(torchrun + ["--resume"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [2, 4, 6]
    for a, b in zip(full, resumed):  # step 4's window straddles the checkpoint at step 3
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-5, abs=1e-8)
