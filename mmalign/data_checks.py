"""Checks on preference data shared by the text and image backends (run when the data is loaded, before training).

A row whose chosen and rejected responses are the same has a zero margin and a zero gradient under every
pairwise objective, and counts as wrong in ``rewards/accuracies``: it trains nothing and skews the metrics.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Sequence

__all__ = ["check_identical_responses"]

logger = logging.getLogger("mmalign.data")

_SHOWN = 5


def _key(value: Any) -> str:
    # responses may be strings, message lists or image entries: compare a canonical JSON form
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def check_identical_responses(rows: Iterable[tuple[int, Sequence[Any], Sequence[Any]]], *, source: str,
                              what: str = "response", refuse_all: bool = True) -> list[int]:
    """``rows``: (row number, chosen members, rejected members). Warns with the count and the first row numbers of
    rows where a chosen member equals a rejected one; a ValueError when every row is such (unless ``refuse_all``
    is false: evaluation may score such a set on purpose). Returns those rows."""
    rows = list(rows)
    same = [number for number, chosen, rejected in rows
            if {_key(c) for c in chosen} & {_key(r) for r in rejected}]
    if not same:
        return same
    first = ", ".join(str(n) for n in same[:_SHOWN]) + (", ..." if len(same) > _SHOWN else "")
    if len(same) == len(rows) and refuse_all:
        raise ValueError(f"{source}: every row ({len(rows)}) has a chosen {what} identical to a rejected one (rows "
                         f"{first}): there is no preference to learn; check the chosen/rejected columns")
    logger.warning("%s: %d of %d row(s) have a chosen %s identical to a rejected one (rows %s): they add no "
                   "gradient and count as wrong in rewards/accuracies", source, len(same), len(rows), what, first)
    return same
