"""Demographic debiasing of a text-to-image model with multi-sample preference optimisation (thesis §3.6.2,
SPEC §7): ``python -m mmalign.image.debias`` or ``mmalign_experiments.debias.run(config)``; see docs/debias.md."""

from mmalign_experiments.debias.config import DebiasConfig
from mmalign_experiments.debias.pipeline import run

__all__ = ["DebiasConfig", "run", "main"]


def main(argv=None):
    from mmalign_experiments.debias.cli import main as cli_main

    return cli_main(argv)
