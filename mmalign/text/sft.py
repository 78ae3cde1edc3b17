"""CLI and call: ``python -m mmalign.text.sft --config run.yaml`` and ``mmalign.text.sft(config)``;
the recipe lives in :mod:`mmalign.text.recipes.sft`."""
import sys

from mmalign.entrypoints import make_module_callable
from mmalign.text.recipes.sft import main, train

make_module_callable(__name__, train)

if __name__ == "__main__":
    sys.exit(main())
