"""Rows for reward models and bins: ``{prompt, chosen, rejected, ...}`` strings, HH dialogues split, every row checked."""
from __future__ import annotations

import math
from typing import Any, Optional

from mmalign.text.data.files import load_rows
from mmalign.text.data.prompts import HH_ASSISTANT, split_hh_dialogue, split_implicit_prompt

__all__ = ["load_reward_rows"]


def load_reward_rows(source: Any, *, split: str = "train", max_samples: Optional[int] = None,
                     name: Optional[str] = None) -> list[dict[str, Any]]:
    """Rows ``{prompt, chosen, rejected, ...}`` (strings) from a file or hub dataset; HH dialogues are split.

    Every row is validated: missing/non-string/empty text fields, identical responses, and NaN or infinite
    numeric columns are errors naming the source, the (1-based) row and the field.
    """
    raw = load_rows(source, split=split, max_samples=max_samples, name=name)
    source = raw.source  # a file name, or e.g. "train_dataset (Dataset)"
    rows = []
    for index in range(len(raw)):
        row = dict(raw[index])
        number = index + 1
        if "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            if HH_ASSISTANT not in row["chosen"]:  # TRL's implicit-prompt rows: the common prefix is the prompt
                try:
                    prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
                except ValueError as err:
                    raise ValueError(f"{source}: row {number}: field 'rejected': {err}") from None
            else:
                prompt, chosen = split_hh_dialogue(row["chosen"], row=number, field="chosen", source=source)
                prompt_l, rejected = split_hh_dialogue(row["rejected"], row=number, field="rejected", source=source)
                if prompt != prompt_l:
                    raise ValueError(f"{source}: row {number}: field 'rejected': the dialogue differs from the chosen "
                                     "one before the last assistant turn")
            row.update(prompt=prompt, chosen=chosen, rejected=rejected)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{source}: row {number}: field {key!r}: expected a string, got {type(row.get(key)).__name__}")
        for key in ("chosen", "rejected"):
            if not row[key].strip():
                raise ValueError(f"{source}: row {number}: field {key!r}: the response is empty")
        for key, value in row.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{source}: row {number}: field {key!r}: NaN or infinite value {value!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows
