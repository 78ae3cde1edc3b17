"""The registry of objectives by name: ``register`` (class decorator), ``objective(name, **hparams)``."""
from __future__ import annotations

import inspect

from mmalign.shared.objectives.base import Objective
from mmalign.shared.objectives.member_pairs import with_pairs

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available to :func:`objective` under `cls.name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"objective name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective(name: str, pairs: object = None, **hparams: object) -> Objective:
    """Build the objective `name` with its hyperparameters, e.g. `objective("fdpo", beta=0.1, divergence="js")`.

    ``pairs="members"`` (config: ``objective.pairs: members``) applies a pairwise objective to the member pairs of
    equal-size groups (:class:`~mmalign.shared.objectives.member_pairs.MemberPairs`, SPEC §1 on SPEC §3's data).
    Unknown names or hyperparameters raise a ValueError that lists what is allowed.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available_objectives())}")
    parameters = inspect.signature(cls.__init__).parameters
    allowed = [key for key in parameters if key != "self"] + ["pairs"]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; allowed: {allowed}")
    missing = [key for key, p in parameters.items() if key != "self" and p.default is p.empty and key not in hparams]
    if missing:
        raise ValueError(f"{name}: missing hyperparameter(s) {missing}; allowed: {allowed}")
    return with_pairs(cls(**hparams), pairs)
