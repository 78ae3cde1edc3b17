"""What the seed sweeps of issue #17 share (label noise, the f-DPO frontier, the two-bias comparison): opening the
run folder with its resolved config, and saving a figure."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar

from mmalign.config import load_config, save_config

T = TypeVar("T")


def open_sweep(config_cls: type[T], config: Any, overrides: Optional[list[str]] = None) -> tuple[T, Path, str]:
    """(validated config, its ``output_dir`` created with ``config.yaml`` inside, the model folder of ``cfg.model``
    — ``smollm2`` converted offline)."""
    from mmalign_experiments.rng.run import resolve_model_path

    cfg = load_config(config_cls, config, overrides or [])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return cfg, out, resolve_model_path(cfg.model)


def finish_figure(fig, path: Path, title: str) -> None:
    from mmalign.engine.plots import save_figure

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
