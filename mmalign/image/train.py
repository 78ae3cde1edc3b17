"""CLI: ``python -m mmalign.image.train --config run.yaml [--set key=value ...]`` (``--help`` lists every key).

``mmalign.image.train(config)`` trains on a preference set (:func:`mmalign.image.training.train`), or, when the
config has a ``rounds:`` section, runs online rounds (:func:`mmalign.image.online.online`: generate → score →
group → train, repeated); both return a :class:`~mmalign.engine.TrainResult`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from mmalign.cli import run_command
from mmalign.config import ConfigError, load_config, read_yaml_mapping
from mmalign.engine.result import TrainResult
from mmalign.entrypoints import make_module_callable
from mmalign.image import training
from mmalign.image.config import ImageTrainConfig

__all__ = ["train", "main"]


def _has_rounds(config: Any, overrides) -> bool:
    if any(str(o).split("=", 1)[0].split(".")[0] == "rounds" for o in overrides):
        return True
    if isinstance(config, ImageTrainConfig):
        return config.rounds is not None
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        config = read_yaml_mapping(Path(config))
    return isinstance(config, Mapping) and config.get("rounds") is not None


def train(config: ImageTrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, overrides=(), *,
          pipeline: Any = None, train_dataset: Any = None, eval_dataset: Any = None) -> TrainResult:
    """:func:`mmalign.image.training.train`, or the online rounds of a config with a ``rounds:`` section."""
    if not _has_rounds(config, overrides):
        return training.train(config, overrides, pipeline=pipeline, train_dataset=train_dataset,
                              eval_dataset=eval_dataset)
    if pipeline is not None or train_dataset is not None or eval_dataset is not None:
        raise ConfigError("rounds: online rounds load model.name_or_path and generate their data; pass none of "
                          "pipeline=, train_dataset=, eval_dataset=")
    from mmalign.image.online import online, online_config

    return online(online_config(load_config(ImageTrainConfig, config, list(overrides))))


def _run(config: ImageTrainConfig, args) -> int:
    result = train(config)
    print(f"done: {result.global_step} steps; final model in {result.final_dir}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(
        prog="python -m mmalign.image.train", config_cls=ImageTrainConfig, run=_run, argv=argv,
        description="Preference-tune a text-to-image diffusion model (Diffusion-DPO, mDPO, any mmalign objective on "
                    "the surrogate rho = -(e_theta - e_ref), SPEC §7); with a rounds: section, online rounds "
                    "(generate, score with rounds.reward, group, train; repeated). Example: python -m "
                    "mmalign.image.train --config configs/image/sd15-dpo-pickapic-lora.yaml --set training.max_steps=100")


make_module_callable(__name__, train)

if __name__ == "__main__":
    sys.exit(main())
