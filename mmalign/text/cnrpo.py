"""CLI: ``python -m mmalign.text.cnrpo --config run.yaml [--stage all|bias|main]``; the recipe lives in
:mod:`mmalign.text.recipes.cnrpo`."""
import sys

from mmalign.text.recipes.cnrpo import main

if __name__ == "__main__":
    sys.exit(main())
