"""The text backend: preference optimisation of causal LMs on the shared engine.

    import mmalign.text
    summary = mmalign.text.train("configs/text/dpo-tiny.yaml")      # or a TextTrainConfig / dict
    python -m mmalign.text.train --config configs/text/dpo-tiny.yaml --set training.learning_rate=1e-5
    python -m mmalign.text.sft --config configs/text/sft-tiny.yaml

Subpackages: ``data`` (reading files, row schemas, prompt rendering, tokenisation, collation, bins),
``modeling`` (loading, LoRA, references, memory-efficient response log-likelihoods, sampling), ``recipes``
(preference training, SFT, reward models, CNRPO) and ``evaluation``. ``config`` holds :class:`TextTrainConfig`.
The modules ``train``, ``sft``, ``reward``, ``cnrpo``, ``evaluate``, ``bins`` and ``smollm`` are the
``python -m mmalign.text.<name>`` command lines; ``train``, ``sft``, ``evaluate`` and ``online`` (online alignment
against a reward, :mod:`mmalign.text.online`) are also callable.
"""
import importlib
from typing import Any

__all__ = ["train", "sft", "evaluate", "online", "TextTrainConfig"]

_MODULES = ("train", "sft", "online", "reward", "cnrpo", "evaluate", "config", "data", "modeling", "recipes", "evaluation")


def __getattr__(name: str) -> Any:
    # Lazy: `python -m mmalign.text.train` must not find its own module pre-imported by the package.
    # `train` and `sft` are modules that are also callable: mmalign.text.train(config) runs a preference job.
    if name in _MODULES:
        return importlib.import_module(f"mmalign.text.{name}")
    if name == "TextTrainConfig":
        from mmalign.text.config import TextTrainConfig

        return TextTrainConfig
    raise AttributeError(f"module 'mmalign.text' has no attribute {name!r}")
