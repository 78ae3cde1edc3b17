"""Hyperparameter checks of the objectives: each says what was wrong and what is allowed."""
from __future__ import annotations

import math


def finite_number(name: str, value: object, objective: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{objective}: {name} must be a finite number; got {value!r}")
    return float(value)


def positive_number(name: str, value: object, objective: str) -> float:
    value = finite_number(name, value, objective)
    if value <= 0:
        raise ValueError(f"{objective}: {name} must be > 0; got {value}")
    return value


def noise_rate(value: object, objective: str) -> float:
    value = finite_number("eps", value, objective)
    if not 0 <= value < 0.5:
        raise ValueError(f"{objective}: eps (the label-flip rate) must be in [0, 0.5); got {value}")
    return value
