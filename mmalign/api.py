"""``mmalign.train(config=None, **objects)``: one call for a text or an image preference job.

The backend comes from the objects given (``model`` / ``tokenizer``: text; ``pipeline``: image) or from the
config's ``modality: text|image`` key; the config vocabulary is the same for both (``model``, ``lora``,
``reference``, ``objective``, ``data``, ``training``, ``output_dir``). Both return a
:class:`~mmalign.engine.TrainResult`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from mmalign.config import ConfigError, read_yaml_mapping

__all__ = ["train", "MODALITIES"]

MODALITIES = ("text", "image")
_TEXT_OBJECTS = ("model", "tokenizer")
_IMAGE_OBJECTS = ("pipeline",)


def _split_modality(config: Any) -> tuple[Any, Optional[str]]:
    """The config without its ``modality`` key, and that key (None when absent)."""
    if isinstance(config, (str, os.PathLike)):
        data = read_yaml_mapping(Path(config))
        if "modality" not in data:
            return config, None
        config = data
    if isinstance(config, Mapping):
        config = dict(config)
        modality = config.pop("modality", None)
        if modality is not None and modality not in MODALITIES:
            raise ConfigError(f"modality: invalid value {modality!r}; expected one of {', '.join(MODALITIES)}")
        return config, modality
    return config, None


def _modality_of(config: Any, declared: Optional[str], objects: Mapping[str, Any]) -> str:
    from mmalign.image.config import ImageTrainConfig
    from mmalign.text.config import TextTrainConfig

    implied = {m for m, names in (("text", _TEXT_OBJECTS), ("image", _IMAGE_OBJECTS))
               if any(objects.get(n) is not None for n in names)}
    if isinstance(config, TextTrainConfig):
        implied.add("text")
    elif isinstance(config, ImageTrainConfig):
        implied.add("image")
    if declared is not None:
        implied.add(declared)
    if len(implied) > 1:
        raise ConfigError(f"modality: the config and the objects disagree ({' and '.join(sorted(implied))}); a "
                          "text job takes model=/tokenizer=, an image job pipeline=")
    if not implied:
        raise ConfigError("modality: required when no model, tokenizer or pipeline object says which backend to "
                          "use; set modality: text or modality: image in the config")
    return implied.pop()


def train(config: Any = None, **objects: Any):
    """Runs a preference job on the backend its objects or ``modality`` key choose; returns a ``TrainResult``.

    ``objects``: ``model``, ``tokenizer``, ``train_dataset``, ``eval_dataset`` (text, see
    :func:`mmalign.text.train`) or ``pipeline``, ``train_dataset`` (image, see :func:`mmalign.image.train`).
    """
    config, declared = _split_modality(config)
    modality = _modality_of(config, declared, objects)
    allowed = {"text": {"model", "tokenizer", "train_dataset", "eval_dataset", "overrides"},
               "image": {"pipeline", "train_dataset", "eval_dataset", "overrides"}}[modality]
    unknown = sorted(set(objects) - allowed)
    if unknown:
        raise TypeError(f"mmalign.train: {'an' if modality == 'image' else 'a'} {modality} job takes {', '.join(sorted(allowed))}; got {', '.join(unknown)}")
    if modality == "text":
        from mmalign.text.recipes.preference import train as train_text

        return train_text(config, **objects)
    from mmalign.image.training import train as train_image

    return train_image(config, **objects)
