"""Crash/resume torture shared by the text and image trainers: SIGKILL at each injected point
(``mmalign.engine.faults``), resume from the latest checkpoint, and compare with an uninterrupted run bit for bit
(every logged metric of every step, every final weight)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# (point, step) for a run of 6 steps, a checkpoint every 2, the last 2 kept, a log line every step
KILLS = [("checkpoint_files", 4), ("checkpoint_manifest", 4), ("before_rotation", 6), ("mid_rotation", 6),
         ("metrics_line", 5), ("before_final", 6), ("final_tmp", 6)]
TRAINING = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "logging_steps": 1, "progress_bar": False,
            "plot": False, "num_threads": 1}

_SCRIPT = """
import json, sys
kind, path, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfg = json.load(open(path))
if kind == "image":
    import mmalign.image
    cfg["training"]["resume_from_checkpoint"] = "latest" if resume else None
    mmalign.image.train(cfg)
elif kind == "image_online":
    import mmalign.image
    cfg["training"]["resume_from_checkpoint"] = "latest" if resume else None
    mmalign.image.online(cfg)
elif kind == "online":
    import mmalign.text
    mmalign.text.online(cfg, resume_from_checkpoint="latest" if resume else None)
else:
    import mmalign.text
    mmalign.text.train(cfg, resume_from_checkpoint="latest" if resume else None)
"""


def run(kind, config, fault=None, resume=False):
    path = Path(config["output_dir"]).with_suffix(".json")
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMALIGN_FAULT_INJECT": fault or "", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _SCRIPT, kind, str(path), "1" if resume else "0"], env=env,
                          cwd=str(path.parent), capture_output=True, text=True, timeout=600)


def logged(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    wall_clock = ("tokens/s", "rollout/tokens_per_s")  # rates of wall time, not of the computation
    return [{k: v for k, v in r.items() if k not in wall_clock} for r in rows]


def final_weights(run_dir):
    files = sorted((Path(run_dir) / "final").rglob("*.safetensors"))
    assert files, f"no weights in {run_dir}/final"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def torture(kind, make_config, tmp_path, kills=KILLS):
    """``make_config(output_dir)`` -> a config dict of ``kind`` (text/image/online) using :data:`TRAINING`."""
    reference = make_config(tmp_path / "reference")
    done = run(kind, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    expected_rows, expected_weights = logged(reference["output_dir"]), final_weights(reference["output_dir"])
    assert [r["step"] for r in expected_rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for point, step in kills:
        config = make_config(tmp_path / f"{point}-{step}")
        killed = run(kind, config, fault=f"{point}:{step}")
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-3000:])
        resumed = run(kind, config, resume=True)
        assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
        assert logged(config["output_dir"]) == expected_rows, point
        weights = final_weights(config["output_dir"])
        assert weights.keys() == expected_weights.keys(), point
        for key, value in expected_weights.items():
            assert weights[key].equal(value), (point, key)
        leftovers = [p.name for p in (Path(config["output_dir"]) / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not leftovers, (point, leftovers)
