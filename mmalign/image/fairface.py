"""FairFace 32×32 faces: loading, label maps and the debiasing experiment's race groups.

The pack lives in ``fairface32/`` of the data folder (``$MMALIGN_DATA_DIR``, default ``../shared/data``; ``train.npz``, ``val.npz``, ``labels.json``; see its README):
``images`` uint8 [N, 32, 32, 3] RGB plus int8 ``gender`` (0 Male, 1 Female), ``race`` (7 FairFace races) and
``age`` (9 bins). FairFace is CC BY 4.0 (Kärkkäinen & Joo, WACV 2021); the pack's images are resized to 32×32.

Race groups of the debiasing experiment (thesis §3.6.2, SPEC §7): the paper prompts and scores
{black, white, asian}. FairFace's 7 races map onto them as

=================  =========
FairFace race      group
=================  =========
White              white
Black              black
East Asian         asian
Southeast Asian    asian
Latino_Hispanic    other
Indian             other
Middle Eastern     other
=================  =========

"other" is kept as its own bucket (never silently merged into a group), so a classifier that sees a face outside
the three groups says so, and the Simpson index over groups can count or drop it explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmalign.resources import data_dir

GENDERS: tuple[str, ...] = ("male", "female")  # index = FairFace gender code
FAIRFACE_RACES: tuple[str, ...] = (
    "White",
    "Black",
    "Latino_Hispanic",
    "East Asian",
    "Southeast Asian",
    "Indian",
    "Middle Eastern",
)
AGE_BINS: tuple[str, ...] = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
RACE_GROUPS: tuple[str, ...] = ("white", "black", "asian")  # the paper's groups
RACE_GROUPS_WITH_OTHER: tuple[str, ...] = RACE_GROUPS + ("other",)
FAIRFACE_RACE_TO_GROUP: dict[str, str] = {
    "White": "white",
    "Black": "black",
    "East Asian": "asian",
    "Southeast Asian": "asian",
    "Latino_Hispanic": "other",
    "Indian": "other",
    "Middle Eastern": "other",
}
ADULT_AGE_MIN_BIN = 3  # "20-29": the portraits of workers the experiment prompts for are adults

_SPLITS = ("train", "val")
_REQUIRED_KEYS = ("images", "gender", "race", "age")


def default_fairface_dir() -> Path:
    """``$MMALIGN_FAIRFACE_DIR`` if set, else ``fairface32`` in the data folder (``$MMALIGN_DATA_DIR``, default
    ``../shared/data`` from the current directory; :func:`mmalign.resources.data_dir`)."""
    env = os.environ.get("MMALIGN_FAIRFACE_DIR")
    return Path(env).expanduser() if env else data_dir() / "fairface32"


@dataclass(frozen=True)
class FairFaceSplit:
    """One split of the pack, arrays aligned by row."""

    images: np.ndarray  # uint8 [N, 32, 32, 3] RGB
    gender: np.ndarray  # int64 [N], index into GENDERS
    race: np.ndarray  # int64 [N], index into FAIRFACE_RACES
    age: np.ndarray  # int64 [N], index into AGE_BINS
    split: str
    path: Path

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def race_group(self) -> np.ndarray:
        """int64 [N], index into RACE_GROUPS_WITH_OTHER (3 = other)."""
        return race_to_group_index(self.race)

    def subset(self, mask_or_index: np.ndarray) -> FairFaceSplit:
        return FairFaceSplit(
            images=self.images[mask_or_index],
            gender=self.gender[mask_or_index],
            race=self.race[mask_or_index],
            age=self.age[mask_or_index],
            split=self.split,
            path=self.path,
        )


_RACE_TO_GROUP_INDEX = np.array(
    [RACE_GROUPS_WITH_OTHER.index(FAIRFACE_RACE_TO_GROUP[r]) for r in FAIRFACE_RACES], dtype=np.int64
)


def race_to_group_index(race: np.ndarray) -> np.ndarray:
    """Map FairFace race codes (0..6) to indices into RACE_GROUPS_WITH_OTHER."""
    return _RACE_TO_GROUP_INDEX[np.asarray(race, dtype=np.int64)]


def group_probabilities_from_races(race_probs: np.ndarray) -> np.ndarray:
    """Sum 7-race probabilities [N, 7] into group probabilities [N, 4] (white, black, asian, other)."""
    race_probs = np.asarray(race_probs, dtype=np.float64)
    if race_probs.ndim != 2 or race_probs.shape[1] != len(FAIRFACE_RACES):
        raise ValueError(f"race probabilities must have shape [N, {len(FAIRFACE_RACES)}], got {race_probs.shape}")
    out = np.zeros((race_probs.shape[0], len(RACE_GROUPS_WITH_OTHER)))
    np.add.at(out.T, _RACE_TO_GROUP_INDEX, race_probs.T)
    return out


def load_fairface(split: str, data_dir: str | os.PathLike | None = None) -> FairFaceSplit:
    """Load ``{split}.npz`` of the FairFace 32×32 pack.

    Raises FileNotFoundError naming the missing file (and how to point elsewhere), ValueError on a malformed file.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_fairface_dir()
    path = root / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"FairFace 32x32 pack not found: {path} does not exist. Expected fairface32/ (train.npz, val.npz, "
            "labels.json) in the data folder $MMALIGN_DATA_DIR (default ../shared/data from the current directory); "
            "set MMALIGN_DATA_DIR or MMALIGN_FAIRFACE_DIR (the pack folder itself), or pass data_dir=..."
        )
    _check_labels_json(root)
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in _REQUIRED_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing} (has {npz.files})")
        images = npz["images"]
        labels = {k: npz[k].astype(np.int64) for k in ("gender", "race", "age")}
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: field 'images' must be uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
    bounds = {"gender": len(GENDERS), "race": len(FAIRFACE_RACES), "age": len(AGE_BINS)}
    for name, values in labels.items():
        if values.shape != (images.shape[0],):
            raise ValueError(f"{path}: field {name!r} has shape {values.shape}, expected ({images.shape[0]},)")
        bad = np.flatnonzero((values < 0) | (values >= bounds[name]))
        if bad.size:
            raise ValueError(f"{path}: row {int(bad[0])}, field {name!r}: code {int(values[bad[0]])} out of range")
    return FairFaceSplit(images=images, split=split, path=path, **labels)


def _check_labels_json(root: Path) -> None:
    """The label order is hard-coded above; refuse a pack whose labels.json disagrees."""
    path = root / "labels.json"
    if not path.is_file():
        return  # labels.json is documentation; the npz alone is enough
    names = json.loads(path.read_text())
    if [g.lower() for g in names.get("gender", [])] != list(GENDERS):
        raise ValueError(f"{path}: field 'gender' is {names.get('gender')}, expected {list(GENDERS)} (case-insensitive)")
    if list(names.get("race", [])) != list(FAIRFACE_RACES):
        raise ValueError(f"{path}: field 'race' is {names.get('race')}, expected {list(FAIRFACE_RACES)}")
    if len(names.get("age", [])) != len(AGE_BINS):
        raise ValueError(f"{path}: field 'age' has {len(names.get('age', []))} bins, expected {len(AGE_BINS)}")
