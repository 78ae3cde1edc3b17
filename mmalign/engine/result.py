"""What every training call returns, text or image: :class:`TrainResult`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["TrainResult", "read_metric_rows"]


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` ([] when the file does not exist, e.g. on a non-main process)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class TrainResult:
    """One training run's outcome.

    ``model``: the trained model (text: the ``PreTrainedModel`` / ``PeftModel``; image: the diffusers pipeline with
    the trained UNet); ``output_dir``; ``log``: every logged metric row (as in ``metrics.jsonl``); ``metrics``: the
    last logged metrics; ``details``: what the backend adds (reference mode, number of examples, bins, ...).
    ``result["global_step"]`` reads a field or a detail by name, like the summary dicts of the command lines.
    """

    model: Any
    output_dir: Path
    log: list[dict[str, Any]]
    metrics: dict[str, Any]
    global_step: int
    epoch: float
    train_runtime_s: float
    final_dir: Optional[Path] = None
    plot_path: Optional[Path] = None
    tokenizer: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], *, model: Any, output_dir: str | Path, tokenizer: Any = None,
                     **details: Any) -> "TrainResult":
        """From the engine's summary dict (:meth:`mmalign.engine.Trainer.train`)."""
        output_dir = Path(output_dir)
        known = {"global_step", "epoch", "train_runtime_s", "metrics", "final_dir", "plot_path", "metrics_path"}
        extra = {k: v for k, v in summary.items() if k not in known}
        return cls(
            model=model, output_dir=output_dir, log=read_metric_rows(output_dir / "metrics.jsonl"),
            metrics=dict(summary.get("metrics", {})), global_step=int(summary["global_step"]),
            epoch=float(summary.get("epoch", 0.0)), train_runtime_s=float(summary.get("train_runtime_s", 0.0)),
            final_dir=Path(summary["final_dir"]) if summary.get("final_dir") else None,
            plot_path=Path(summary["plot_path"]) if summary.get("plot_path") else None,
            tokenizer=tokenizer, details={**extra, **details},
        )

    def __getitem__(self, key: str) -> Any:
        if key in self.details:
            return self.details[key]
        if key == "details" or key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        value = getattr(self, key)
        return str(value) if isinstance(value, Path) else value

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def summary(self) -> dict[str, Any]:
        """The run as plain values (paths as strings): the engine's summary plus the backend's details."""
        scalars = {"global_step": self.global_step, "epoch": self.epoch, "train_runtime_s": self.train_runtime_s,
                   "metrics": dict(self.metrics), "metrics_path": str(self.metrics_path),
                   "plot_path": str(self.plot_path) if self.plot_path else None,
                   "final_dir": str(self.final_dir) if self.final_dir else None, "output_dir": str(self.output_dir)}
        return {**scalars, **self.details}

    def summary_line(self) -> str:
        numbers = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}
        return (f"done: {self.global_step} steps in {self.train_runtime_s:.1f}s; final model: {self.final_dir}; "
                "last metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
