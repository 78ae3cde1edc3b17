"""Occupations of the debiasing experiment and their train / held-out split (thesis §3.6.2, SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmalign.image.face_model.prompts import Occupation, load_occupations, spread_occupations

__all__ = ["OccupationSplit", "select_occupations", "split_occupations"]


@dataclass(frozen=True)
class OccupationSplit:
    train: list[Occupation]
    eval: list[Occupation]

    def as_dict(self) -> dict[str, list[dict]]:
        return {name: [{"occupation": o.name, "bls_share_women": o.bls_share_women} for o in part]
                for name, part in (("train", self.train), ("eval", self.eval))}


def select_occupations(count: int, names: list[str] | None = None, path: str | None = None) -> list[Occupation]:
    """``names`` from the occupations file (each must exist), else ``count`` of them evenly spread over the 2019 BLS
    share of women, so that both stereotyped directions and the balanced middle are represented."""
    if names:
        known = {o.name: o for o in load_occupations(path)}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"occupations.names: {missing} not in the occupations file")
        if len(set(names)) != len(names):
            raise ValueError("occupations.names: duplicates")
        return [known[n] for n in names]
    chosen = spread_occupations(count, path)
    if len(chosen) < count:
        raise ValueError(f"occupations.count={count}, but the file yields only {len(chosen)} distinct occupations")
    return chosen


def split_occupations(occupations: list[Occupation], eval_fraction: float, seed: int) -> OccupationSplit:
    """Held-out occupations, stratified over the BLS share: sorted by it, cut into strata of ``1/eval_fraction``
    consecutive occupations, one drawn at random (seeded) from each stratum. Deterministic for a seed; an
    occupation is in exactly one part."""
    ordered = sorted(occupations, key=lambda o: (o.bls_share_women, o.name))
    n_eval = max(1, int(round(len(ordered) * eval_fraction)))
    if n_eval >= len(ordered):
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training occupation among {len(ordered)}")
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, len(ordered), n_eval + 1).round().astype(int)
    held = {int(rng.integers(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])}
    return OccupationSplit(train=[o for i, o in enumerate(ordered) if i not in held],
                           eval=[o for i, o in enumerate(ordered) if i in held])
