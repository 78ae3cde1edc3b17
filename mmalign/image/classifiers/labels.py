"""One label per image from a classifier's probabilities, restricted to the groups an experiment asks for."""
from __future__ import annotations

from typing import Sequence

from mmalign.image.classifiers.base import AttributePrediction

__all__ = ["gender_label", "race_label", "label_images"]


def gender_label(prediction: AttributePrediction, genders: Sequence[str]) -> str:
    """The most probable of ``genders``, whether or not a face was found (the no-face rate is reported apart)."""
    return max(genders, key=lambda g: prediction.probabilities[g])


def race_label(prediction: AttributePrediction, races: Sequence[str], scoring: str) -> str:
    """``requested``: the most probable of the experiment's ``races`` (probabilities renormalised over them);
    ``all``: the classifier's own top label over all its groups, "other" included."""
    if scoring == "requested":
        return max(races, key=lambda r: prediction.probabilities[r])
    if scoring == "all":
        return max(prediction.probabilities, key=prediction.probabilities.get)
    raise ValueError(f"race scoring {scoring!r}: expected 'requested' or 'all'")


def label_images(predictions: dict[str, list[AttributePrediction]], genders: Sequence[str], races: Sequence[str],
                 scoring: str) -> tuple[list[str], list[str]]:
    return ([gender_label(p, genders) for p in predictions["gender"]],
            [race_label(p, races, scoring) for p in predictions["race"]])
