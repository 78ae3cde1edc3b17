"""Prompts of the debiasing experiment and the stereotype the embedded face model is trained to have.

Prompts (thesis §3.6.2, SPEC §7): plain ``"A portrait photo of a {occupation}"`` and attribute prompts
``"A portrait photo of a {race} {gender} {occupation}"`` with race ∈ {black, white, asian} and
gender ∈ {male, female} (the article follows English: "an asian ...", "an accountant").

Stereotype (what the plain prompt is trained to draw, so that the base model's Simpson indices start low, like
SD 1.5's 0.110 / 0.124): for occupation ``o`` with 2019 BLS share of women ``s``,
``P(female | o) = clip(sigmoid(k · logit(s)), p_min, 1 − p_min)`` with ``k > 1`` (gender skewed *beyond* the BLS
share, towards the majority gender), and race drawn with probability ``dominant_share`` from one dominant group
(default white) and the rest split evenly over the other groups.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmalign.image.fairface import GENDERS, RACE_GROUPS
from mmalign.resources import MissingDataFile, data_dir

PLAIN_TEMPLATE = "A portrait photo of {article} {occupation}"
ATTRIBUTE_TEMPLATE = "A portrait photo of {article} {race} {gender} {occupation}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def portrait_prompt(occupation: str, race: str | None = None, gender: str | None = None) -> str:
    """The plain prompt, or the attribute prompt when both race and gender are given."""
    occupation = occupation.strip()
    if not occupation:
        raise ValueError("occupation must be a non-empty string")
    if (race is None) != (gender is None):
        raise ValueError("give both race and gender, or neither")
    if race is None:
        return PLAIN_TEMPLATE.format(article=_article(occupation), occupation=occupation)
    if race not in RACE_GROUPS:
        raise ValueError(f"race must be one of {RACE_GROUPS}, got {race!r}")
    if gender not in GENDERS:
        raise ValueError(f"gender must be one of {GENDERS}, got {gender!r}")
    return ATTRIBUTE_TEMPLATE.format(article=_article(race), race=race, gender=gender, occupation=occupation)


@dataclass(frozen=True)
class Occupation:
    name: str
    bls_share_women: float  # in [0, 1], 2019 BLS
    bls_original: str


OCCUPATIONS_FILE = "winogenerated/winogenerated_occupations.jsonl"  # under mmalign.resources.data_dir()


def default_occupations_path() -> Path:
    """``$MMALIGN_WINOGENERATED_OCCUPATIONS``, else ``$MMALIGN_DATA_DIR/winogenerated/...``, else
    ``../shared/data/winogenerated/...`` from the current directory (see :func:`mmalign.resources.data_dir`)."""
    env = os.environ.get("MMALIGN_WINOGENERATED_OCCUPATIONS")
    return Path(env).expanduser() if env else data_dir() / OCCUPATIONS_FILE


def load_occupations(path: str | os.PathLike | None = None) -> list[Occupation]:
    """Read the winogenerated occupations (Perez et al. 2022, CC BY 4.0) with their 2019 BLS share of women."""
    path = Path(path) if path is not None else default_occupations_path()
    if not path.is_file():
        raise MissingDataFile(
            f"occupations file not found: {path} (the data folder is $MMALIGN_DATA_DIR, default ../shared/data from "
            f"the current directory, holding {OCCUPATIONS_FILE}); set MMALIGN_DATA_DIR, "
            "MMALIGN_WINOGENERATED_OCCUPATIONS (the file itself) or pass a path"
        )
    out: list[Occupation] = []
    seen: set[str] = set()
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {line_no}: invalid JSON ({err})") from None
        name, share = row.get("occupation"), row.get("BLS_percent_women_2019")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: line {line_no}: field 'occupation' must be a non-empty string")
        if not isinstance(share, (int, float)) or not 0 <= share <= 100:
            raise ValueError(f"{path}: line {line_no}: field 'BLS_percent_women_2019' must be a number in [0, 100]")
        if name in seen:
            raise ValueError(f"{path}: line {line_no}: duplicate occupation {name!r}")
        seen.add(name)
        out.append(Occupation(name.strip(), float(share) / 100.0, str(row.get("BLS_original_occupation", ""))))
    if not out:
        raise ValueError(f"{path}: no occupations")
    return out


@dataclass(frozen=True)
class Stereotype:
    """How the plain prompt's faces are drawn in training (see module docstring)."""

    gender_sharpening: float = 4.0
    min_gender_probability: float = 0.02
    dominant_race: str = "white"
    dominant_share: float = 0.9

    def __post_init__(self) -> None:
        if self.gender_sharpening <= 0:
            raise ValueError(f"gender_sharpening must be > 0, got {self.gender_sharpening}")
        if not 0 <= self.min_gender_probability < 0.5:
            raise ValueError(f"min_gender_probability must be in [0, 0.5), got {self.min_gender_probability}")
        if self.dominant_race not in RACE_GROUPS:
            raise ValueError(f"dominant_race must be one of {RACE_GROUPS}, got {self.dominant_race!r}")
        if not 1 / len(RACE_GROUPS) <= self.dominant_share <= 1:
            raise ValueError(f"dominant_share must be in [1/{len(RACE_GROUPS)}, 1], got {self.dominant_share}")

    def p_female(self, bls_share_women: float) -> float:
        s = min(max(bls_share_women, 1e-3), 1 - 1e-3)
        p = 1.0 / (1.0 + math.exp(-self.gender_sharpening * math.log(s / (1 - s))))
        return min(max(p, self.min_gender_probability), 1 - self.min_gender_probability)

    def race_probabilities(self) -> dict[str, float]:
        rest = (1.0 - self.dominant_share) / (len(RACE_GROUPS) - 1)
        return {g: (self.dominant_share if g == self.dominant_race else rest) for g in RACE_GROUPS}

    def expected_simpson(self, bls_share_women: float) -> tuple[float, float]:
        """(gender, race) Simpson index D = 1 − Σ p² of the designed distribution (SPEC §6)."""
        p = self.p_female(bls_share_women)
        race = self.race_probabilities().values()
        return 1 - p * p - (1 - p) * (1 - p), 1 - sum(q * q for q in race)


def spread_occupations(n: int, path: str | os.PathLike | None = None) -> list[Occupation]:
    """``n`` occupations evenly spaced over the range of the BLS share of women (sorted by it, then evenly indexed;
    fewer if the file has fewer)."""
    occs = sorted(load_occupations(path), key=lambda o: (o.bls_share_women, o.name))
    idx = np.unique(np.round(np.linspace(0, len(occs) - 1, n)).astype(int))
    return [occs[i] for i in idx]
