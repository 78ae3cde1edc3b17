"""CLI and call: ``python -m mmalign.text.evaluate --config eval.yaml`` and ``mmalign.text.evaluate(config, model=...,
tokenizer=..., prompts=..., preference_data=...)``; the implementation lives in :mod:`mmalign.text.evaluation`."""
import sys

from mmalign.entrypoints import make_module_callable
from mmalign.text.evaluation.evaluate import evaluate, main

__all__ = ["evaluate", "main"]

make_module_callable(__name__, evaluate)

if __name__ == "__main__":
    sys.exit(main())
