"""``python -m mmalign_experiments.rng`` (= ``python -m mmalign``): the RNG quickstart."""
import sys

from mmalign_experiments.rng.run import main

if __name__ == "__main__":
    sys.exit(main())
