"""Preference groups of the debiasing experiment (thesis §3.6.2, SPEC §7).

For a training occupation *o* and the plain prompt "A portrait photo of a *o*": the chosen group holds one
attribute-prompted image per race × gender cell ("A portrait photo of a {race} {gender} *o*"), the rejected group
``k_l`` of the base model's own images for the plain prompt. Both are trained under the plain prompt. With
``filter: gender`` (the default) a chosen image is kept only if the classifier sees the requested gender (the first
of ``candidates_per_cell`` candidates that agrees; ``race`` checks race, ``attributes`` both); a cell with none is
left out, so groups may be ragged, and with ``balance_genders`` a race keeps its cells only if all its genders have
one (the classifiers read generated faces as male more often, so unbalanced filtering would make the chosen groups
male-leaning).
DPO baselines cut each group into pairs (chosen i, rejected i): one pair per member (the same images), or a seeded
draw of a few members per group (the thesis' single-sample DPO takes one).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mmalign_experiments.debias.config import GroupsConfig
from mmalign.image.classifiers.labels import label_images
from mmalign.image.face_model.prompts import Occupation, portrait_prompt
from mmalign.io import atomic_write_text

__all__ = ["PreferenceGroup", "GroupPlan", "plan_groups", "select_chosen", "write_groups", "pairs_from_groups"]


@dataclass(frozen=True)
class PreferenceGroup:
    occupation: str
    prompt: str
    chosen: list[str]  # image files
    chosen_cells: list[tuple[str, str]]  # (race, gender) requested for each chosen image
    rejected: list[str]


@dataclass(frozen=True)
class GroupPlan:
    """Every image a training set needs: (prompt, seed) per candidate and per rejected image."""

    occupation: Occupation
    index: int  # group number within the occupation
    candidates: dict[tuple[str, str], list[tuple[str, int]]]  # cell -> [(attribute prompt, seed)]
    rejected: list[tuple[str, int]]  # [(plain prompt, seed)]

    @property
    def prompt(self) -> str:
        return portrait_prompt(self.occupation.name)


def plan_groups(occupations: Sequence[Occupation], config: GroupsConfig) -> list[GroupPlan]:
    """Deterministic seeds: distinct per occupation, group, cell and candidate; the rejected images of a group use
    their own seed range (prompts differ, so the cache keeps them apart anyway)."""
    cells = [(race, gender) for race in config.races for gender in config.genders]
    plans = []
    for occupation_index, occupation in enumerate(occupations):
        for group in range(config.groups_per_occupation):
            base = config.seed + (occupation_index * config.groups_per_occupation + group) * 1000
            candidates = {
                cell: [(portrait_prompt(occupation.name, *cell), base + c * len(cells) + cell_index)
                       for c in range(config.candidates_per_cell)]
                for cell_index, cell in enumerate(cells)
            }
            rejected = [(portrait_prompt(occupation.name), base + 500 + j) for j in range(config.rejected_per_group)]
            plans.append(GroupPlan(occupation, group, candidates, rejected))
    return plans


# (seen (race, gender), requested (race, gender)) -> keep? for each groups.filter but "none"
_CELL_AGREEMENT = {
    "attributes": lambda seen, requested: seen == requested,
    "gender": lambda seen, requested: seen[1] == requested[1],
    "race": lambda seen, requested: seen[0] == requested[0],
}


def select_chosen(plans: Sequence[GroupPlan], fetch_files: Callable[[list[tuple[str, int]]], dict],
                  classify_files: Callable[[list[str]], dict], config: GroupsConfig,
                  race_scoring: str) -> tuple[list[PreferenceGroup], dict]:
    """Keep one agreeing image per cell (or the first, without filtering), drop groups left with fewer than
    ``min_chosen``. Returns the groups and adherence statistics for the report.

    The rejected images and the candidates are fetched with ``fetch_files(keys) -> {key: file}`` (which samples what
    is not cached); candidates are classified with ``classify_files(files) -> {"gender": [...], "race": [...]}``
    in rounds: round r takes the r-th candidate of only the cells with no agreeing image yet, so most cells cost
    one image, not ``candidates_per_cell``. The kept images are those an all-at-once pass would keep."""
    agrees = _CELL_AGREEMENT.get(config.filter)
    files = fetch_files([key for plan in plans for key in plan.rejected])
    seen_cell = {}
    rounds = 1 if agrees is None else config.candidates_per_cell
    for r in range(rounds):
        keys = [candidates[r] for plan in plans for cell, candidates in plan.candidates.items()
                if r < len(candidates) and not any(agrees(seen_cell[c], cell) for c in candidates[:r])]
        if not keys:
            break
        files.update(fetch_files(keys))
        predictions = classify_files([files[key] for key in keys])
        genders, races = label_images(predictions, config.genders, config.races, race_scoring)
        seen_cell.update({key: (race, gender) for key, race, gender in zip(keys, races, genders)})
    groups, kept_images, dropped_groups, first_agrees = [], 0, 0, []
    for plan in plans:
        chosen, cells = [], []
        for cell, candidates in plan.candidates.items():
            first_agrees.append(seen_cell[candidates[0]] == cell)
            if agrees is None:
                pick = candidates[0]
            else:
                pick = next((c for c in candidates if c in seen_cell and agrees(seen_cell[c], cell)), None)
            if pick is not None:
                chosen.append(files[pick])
                cells.append(cell)
        if config.balance_genders:
            kept_by_race = {race: [g for r, g in cells if r == race] for race in config.races}
            complete = {race for race, genders in kept_by_race.items() if len(genders) == len(config.genders)}
            chosen = [f for f, (race, _) in zip(chosen, cells) if race in complete]
            cells = [cell for cell in cells if cell[0] in complete]
        if len(chosen) < config.min_chosen:
            dropped_groups += 1
            continue
        kept_images += len(chosen)
        groups.append(PreferenceGroup(plan.occupation.name, plan.prompt, chosen, cells,
                                      [files[k] for k in plan.rejected]))
    if not groups:
        raise ValueError(f"no preference group kept {config.min_chosen} chosen images the classifier agrees with; "
                         "lower groups.min_chosen, raise groups.candidates_per_cell, set groups.balance_genders: false "
                         "or groups.filter: none")
    stats = {
        "groups": len(groups), "groups_dropped": dropped_groups, "candidates_classified": len(seen_cell),
        "attribute_agreement_first_candidate": float(np.mean(first_agrees)),
        "chosen_images": kept_images, "chosen_per_group": kept_images / len(groups),
        "cells_per_group": len(config.races) * len(config.genders), "rejected_per_group": config.rejected_per_group,
    }
    return groups, stats


def pairs_from_groups(groups: Sequence[PreferenceGroup], per_group: Optional[int] = None,
                      seed: int = 0) -> list[PreferenceGroup]:
    """Each group → pairs (chosen i, rejected i): all ``min(k_w, k_l)`` of them (DPO on the same images as the group
    methods), or ``per_group`` members drawn per group (seeded by ``seed`` and the prompt)."""
    pairs = []
    for group in groups:
        members = list(zip(group.chosen, group.chosen_cells, group.rejected))
        if per_group is not None and per_group < len(members):
            picked = random.Random(f"{seed}/{group.prompt}").sample(range(len(members)), per_group)
            members = [members[i] for i in sorted(picked)]
        for chosen, cell, rejected in members:
            pairs.append(PreferenceGroup(group.occupation, group.prompt, [chosen], [cell], [rejected]))
    return pairs


def write_groups(groups: Sequence[PreferenceGroup], path: str | Path) -> Path:
    """JSONL ``{prompt, chosen: [files], rejected: [files], occupation, chosen_cells}`` for the image trainer."""
    lines = [json.dumps({"prompt": g.prompt, "chosen": g.chosen, "rejected": g.rejected, "occupation": g.occupation,
                         "chosen_cells": [list(c) for c in g.chosen_cells]}) for g in groups]
    return atomic_write_text(path, "\n".join(lines) + "\n")
