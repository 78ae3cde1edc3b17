"""What the seed sweeps of issue #17 share (label noise, the f-DPO frontier, the two-bias comparison): opening the
run folder with its resolved config, and saving a figure."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from mmalign.config import load_config, save_config, to_dict

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


def same_sign_verdict(differences: Sequence[float], positive: str, negative: str) -> str:
    """The experiments' paired rule on per-seed differences (never empty): ``positive`` when every one is > 0,
    ``negative`` when every one is < 0, else ``not resolved``."""
    if all(d > 0 for d in differences):
        return positive
    if all(d < 0 for d in differences):
        return negative
    return "not resolved"


def mark_reused(target: Path, payload: Any, source: str) -> None:
    """Writes a stored run's ``payload`` as the finished result ``target``, with ``reused_from.txt`` beside it."""
    from mmalign.io import atomic_write_text

    atomic_write_text(target, json.dumps(payload, indent=2))
    atomic_write_text(target.with_name("reused_from.txt"), f"{source}\n")


def stored_rows(path: str | Path, config: Any, ignore: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of an earlier sweep's ``results.json`` (as kept in docs/), after checking that it ran with the
    settings of ``config``: every setting both configs have must be equal, except the keys in ``ignore`` (the
    sweep's grid and bookkeeping: seeds, rates, methods, folders). A setting only one side has is ignored (a key
    added to the driver later). Raises ValueError naming the first setting that differs."""
    stored = json.loads(Path(path).read_text())

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}.{key}" if prefix else key).items()}

    old, new = flat(stored["config"]), flat(to_dict(config))
    for key in sorted(set(old) & set(new)):
        if not any(key == i or key.startswith(i + ".") for i in ignore) and old[key] != new[key]:
            raise ValueError(f"reuse_results {path}: setting {key} was {old[key]!r} there, "
                             f"{new[key]!r} here: its rows cannot be paired with this sweep's")
    return list(stored["rows"])
