"""CLI: ``python -m mmalign.text.evaluate --config eval.yaml``; the implementation lives in
:mod:`mmalign.text.evaluation`."""
import sys

from mmalign.text.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
