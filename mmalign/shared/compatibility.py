"""Does the objective fit the data? One check for both backends, run before any model loads (SPEC §1–§5).

- Pairwise objectives take one chosen and one rejected output per prompt; groups need a group objective (SPEC §3),
  or ``objective.pairs: members`` (SPEC §1 on the member pairs of equal-size groups), whose groups must match in size.
- CNRPO (SPEC §4) needs one bias-aversion weight per trigger, and triggers mean nothing to another objective.
- An objective's required extra inputs (``bins`` of causal_dpo, SPEC §5; the triggered log-likelihoods of cnrpo)
  must be supplied by the data or by the backend.

A backend describes its data in :class:`DataFacts`; the same mismatch gets the same message in text and image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["DataFacts", "TRIGGERED_INPUTS", "check_objective_fits_data"]

#: the inputs a backend's triggered forward supplies (mmalign.engine.targets.triggered_log_likelihoods)
TRIGGERED_INPUTS = ("triggered_chosen", "triggered_rejected")


@dataclass(frozen=True)
class DataFacts:
    """What the objective check needs to know about a job's training data.

    ``source``: names the data in messages (the file, or ``train_dataset``); ``group_sizes``: the largest chosen
    and rejected group; ``inputs``: the extra objective inputs the data or the backend supplies (data columns,
    bins); ``triggers``: the CNRPO triggers the backend's triggered forward attaches (it then supplies
    :data:`TRIGGERED_INPUTS`); ``hints``: per input name (``"*"``: any), how this backend supplies it, appended to
    the message that it is missing.
    """

    source: str
    group_sizes: tuple[int, int] = (1, 1)
    inputs: frozenset[str] = frozenset()
    triggers: tuple[str, ...] = ()
    hints: Mapping[str, str] = field(default_factory=dict)


def check_objective_fits_data(objective: Any, facts: DataFacts) -> None:
    """Raises ``ValueError`` naming the data and the objective when ``objective`` cannot train on ``facts``'s data."""
    name = objective.name
    k_w, k_l = facts.group_sizes
    if (k_w > 1 or k_l > 1) and not objective.accepts_groups:
        raise ValueError(f"{facts.source}: the data has groups (up to {k_w} chosen, {k_l} rejected) but objective "
                         f"{name!r} is pairwise; use objective.name mdpo or mipo, or objective.pairs: members to "
                         f"train {name!r} on the member pairs (chosen_i, rejected_i) of equal-size groups")
    if getattr(objective, "pairs", None) == "members" and k_w != k_l:  # duck-typed objectives may lack it
        raise ValueError(f"{facts.source}: objective.pairs: members pairs member i of the chosen group with member i "
                         f"of the rejected group, but the data's groups have up to {k_w} chosen and {k_l} rejected; "
                         "it needs groups of equal size")
    takes_triggers = set(TRIGGERED_INPUTS) <= set(objective.extra_inputs)
    if facts.triggers and not takes_triggers:
        raise ValueError(f"{facts.source}: {len(facts.triggers)} CNRPO trigger(s) {list(facts.triggers)} but "
                         f"objective {name!r} takes no triggered log-likelihoods; triggers are for objective cnrpo")
    alphas: Optional[list] = getattr(objective, "alphas", None)
    if takes_triggers and facts.triggers and alphas is not None and len(alphas) != len(facts.triggers):
        raise ValueError(f"{facts.source}: objective {name!r} has {len(alphas)} alpha(s) {list(alphas)} for "
                         f"{len(facts.triggers)} trigger(s) {list(facts.triggers)}; give one alpha per trigger")
    supplied = set(facts.inputs) | (set(TRIGGERED_INPUTS) if facts.triggers else set())
    missing = [input_name for input_name in objective.extra_inputs if input_name not in supplied]
    if missing:
        hints = [facts.hints[m] for m in ["*"] + missing if m in facts.hints]
        raise ValueError(f"{facts.source}: objective {name!r} needs input(s) {missing} that the data does not "
                         "provide" + "".join(f"; {hint}" for hint in dict.fromkeys(hints)))
