"""CLI: ``python -m mmalign.text.smollm``: convert the offline SmolLM2-135M-Instruct GGUF once; see
:mod:`mmalign.text.modeling.smollm`."""
import sys

from mmalign.text.modeling.smollm import main

if __name__ == "__main__":
    sys.exit(main())
