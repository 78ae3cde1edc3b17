"""CLI: ``python -m mmalign.text.reward --config run.yaml``; the recipe lives in :mod:`mmalign.text.recipes.reward`."""
import sys

from mmalign.text.recipes.reward import main

if __name__ == "__main__":
    sys.exit(main())
