"""Files shipped inside the package (the YAML configs: ``mmalign/configs/``, the repository's ``configs/`` folder)
and where the data that only experiments need is found (:func:`data_dir`, never relative to the source tree)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIGS_DIR", "DATA_DIR_VARIABLE", "DEFAULT_DATA_DIR", "shipped_config", "data_dir"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DATA_DIR_VARIABLE = "MMALIGN_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def shipped_config(name: str) -> Path:
    """The shipped config ``name`` (e.g. ``"text/rng-quickstart.yaml"``), in a checkout or an installed wheel."""
    return CONFIGS_DIR / name


def data_dir() -> Path:
    """The folder of the experiments' data sets (FairFace 32x32, winogenerated occupations, HH-RLHF):
    ``$MMALIGN_DATA_DIR``, else ``../shared/data`` from the current directory."""
    return Path(os.environ.get(DATA_DIR_VARIABLE) or DEFAULT_DATA_DIR).expanduser()

