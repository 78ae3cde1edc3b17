"""mmalign: preference alignment of LLMs and text-to-image diffusion models, robust to biased preferences.

``mmalign.train(config, **objects)`` runs a text or an image preference job (see :mod:`mmalign.api`);
``mmalign.text.train`` / ``mmalign.image.train`` are the two backends; :func:`objective` is the entry point of
the objective layer (``mmalign.shared.objectives``) both consume.
"""

from mmalign.api import train
from mmalign.engine.result import TrainResult
from mmalign.shared.objectives import ObjectiveOutput, available_objectives, objective

__version__ = "0.1.0"
__all__ = ["train", "TrainResult", "objective", "available_objectives", "ObjectiveOutput", "__version__"]


def __getattr__(name: str):
    # `import mmalign` then `mmalign.text.train(...)` / `mmalign.image.train(...)`: the backends load on first use
    if name in ("text", "image"):
        import importlib

        return importlib.import_module(f"mmalign.{name}")
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")
