"""Image training in two processes (torchrun, gloo on CPU), as `accelerate launch` runs it on N GPUs: the data is
sharded, one metrics log is written, and a resumed run reproduces the uninterrupted one."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from mmalign.engine import read_metrics


@pytest.mark.slow
def test_two_process_image_training_and_exact_resume(tiny_sd_path, toy_data, tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tiny_sd_path)},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(toy_data), "resolution": 32},
        "objective": {"name": "dpo", "beta_d": 1000},
        "training": {"batch_size": 2, "max_steps": 4, "logging_steps": 1, "save_steps": 2, "save_total_limit": None,
                     "learning_rate": 2e-3, "lr_scheduler": "constant", "progress_bar": False, "plot": False,
                     "seed": 0, "num_threads": 1},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmalign.image.train",
                "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(torchrun, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    full = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in full] == [1, 2, 3, 4]  # one log, written by the main process only
    # 8 prompts / (2 per process x 2 processes) = 2 steps per epoch
    assert full[1]["epoch"] == pytest.approx(1.0)
    assert (run / "checkpoints" / "checkpoint-2" / "rng_state_1.safetensors").exists()
    assert (run / "final" / "pytorch_lora_weights.safetensors").exists()

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    again = subprocess.run(torchrun + ["--set", "training.resume_from_checkpoint=latest"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9)
        assert b["implicit_acc"] == pytest.approx(a["implicit_acc"])
