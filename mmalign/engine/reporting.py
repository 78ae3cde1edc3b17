"""Metric sinks: ``metrics.jsonl`` always; TensorBoard, trackio (local) and Weights & Biases on request (imported
lazily; each an optional extra, checked when the config is read)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmalign.io import json_safe

__all__ = ["MetricsWriter", "truncate_jsonl", "format_metrics"]


def format_metrics(row: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A compact one-line rendering for the console."""
    parts = []
    for key, value in row.items():
        if keys is not None and key not in keys:
            continue
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Drops rows logged after ``max_step`` (a resumed run rewrites them), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A crash mid-write can leave a torn last line; it is after the checkpoint by construction.
                continue
            if row.get("step", 0) <= max_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes one row of scalar metrics per call to every configured sink (main process only)."""

    def __init__(self, output_dir: str | os.PathLike, report_to: Sequence[str] = ("jsonl",), run_config: Any = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a")
        self._tensorboard = None
        self._wandb = None
        self._trackio = None
        unknown = set(report_to) - {"jsonl", "tensorboard", "trackio", "wandb"}
        if unknown:
            raise ValueError(f"report_to: unknown sink(s) {sorted(unknown)}; allowed: jsonl, tensorboard, trackio, wandb")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is an optional extra
                raise ImportError("report_to contains 'tensorboard' but the tensorboard package is not installed "
                                  "(pip install tensorboard)") from err
            self._tensorboard = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if "trackio" in report_to:
            try:
                import trackio
            except ImportError as err:
                raise ImportError("report_to contains 'trackio' but trackio is not installed (pip install trackio)") from err
            # local and offline: the run lives in trackio's local database, viewed with `trackio show`
            self._trackio = trackio.init(project=self.output_dir.name, config=run_config)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("report_to contains 'wandb' but wandb is not installed (pip install wandb)") from err
            self._wandb = wandb.init(dir=str(self.output_dir), config=run_config, reinit=True)

    def write(self, row: Mapping[str, Any]) -> None:
        clean = json_safe(row)  # JSON has no NaN/inf: null, so every reader can parse the log
        from mmalign.engine.faults import torn_write

        torn_write(self._jsonl, json.dumps(clean) + "\n", int(row.get("step", 0)))  # torture tests only
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        step = int(row.get("step", 0))
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self._trackio is not None:
            self._trackio.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()
