"""Image preference records (``GroupRecord``) from rows, ``datasets`` tables, Pick-a-Pic rows and group folders."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger("mmalign.image")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class GroupRecord:
    """One preference: a prompt, chosen and rejected images (each a path, bytes, PIL image, array or HF dict).

    ``where`` names the origin (``file.jsonl row 12``) for error messages. ``bin`` is an optional integer for
    causal DPO.
    """

    prompt: str
    chosen: list[Any]
    rejected: list[Any]
    where: str
    bin: Optional[int] = None
    base_dir: Optional[Path] = None


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class DatasetCell:
    """A lazy reference to one image inside a ``datasets.Dataset`` row: decoded only when the image is used, so a
    large dataset (Pick-a-Pic) is never held in memory as images."""

    __slots__ = ("dataset", "row", "field", "member")

    def __init__(self, dataset: Any, row: int, field: str, member: Optional[int] = None):
        self.dataset, self.row, self.field, self.member = dataset, row, field, member

    def resolve(self) -> Any:
        value = self.dataset[self.row][self.field]
        return value[self.member] if self.member is not None else value

    def __repr__(self) -> str:
        return f"{self.field}[{self.member}] of row {self.row + 1}" if self.member is not None else f"{self.field} of row {self.row + 1}"


def records_from_dataset(
    dataset: Any,
    *,
    source: str,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    bin_field: Optional[str] = None,
    base_dir: Optional[Path] = None,
) -> list[GroupRecord]:
    """A ``datasets.Dataset`` → records whose images stay in the dataset (:class:`DatasetCell`) until used.

    Group sizes are read from the Arrow list lengths, so no image is decoded here.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    check_not_pick_a_pic(dataset.column_names, (prompt_field, chosen_field, rejected_field), source)
    for name in (prompt_field, chosen_field, rejected_field) + ((bin_field,) if bin_field else ()):
        if name not in dataset.column_names:
            raise ValueError(f"{source}: missing column {name!r} (columns: {dataset.column_names})")
    arrow = dataset.with_format("arrow")
    sizes = {}
    for name in (chosen_field, rejected_field):
        column = arrow[name]
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            sizes[name] = [0 if n is None else n for n in pc.list_value_length(column).to_pylist()]
        else:
            sizes[name] = None  # one image per row
    prompts = list(dataset[prompt_field])
    bins = list(dataset[bin_field]) if bin_field else [None] * len(prompts)
    records = []
    for index, prompt in enumerate(prompts):
        where = f"{source} row {index + 1}"  # 1-based, like the text side
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field {prompt_field!r} must be a string; got {type(prompt).__name__}")
        members = {}
        for name in (chosen_field, rejected_field):
            if sizes[name] is None:
                members[name] = [DatasetCell(dataset, index, name)]
            else:
                if sizes[name][index] == 0:
                    raise ValueError(f"{where}: field {name!r} is an empty list; every group needs at least one image")
                members[name] = [DatasetCell(dataset, index, name, m) for m in range(sizes[name][index])]
        bin_value = bins[index]
        if bin_field and (isinstance(bin_value, bool) or not isinstance(bin_value, (int, np.integer))):
            raise ValueError(f"{where}: field {bin_field!r} must be an integer bin id; got {bin_value!r}")
        records.append(GroupRecord(prompt, members[chosen_field], members[rejected_field], where,
                                   None if bin_value is None else int(bin_value), base_dir))
    return records


PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def check_not_pick_a_pic(columns: Sequence[str], expected: Sequence[str], source: str) -> None:
    """Rows in Pick-a-Pic's layout read as groups: say which setting reads them, instead of a missing field."""
    if set(PICK_A_PIC_COLUMNS) <= set(columns) and not set(expected) <= set(columns):
        raise ValueError(f"{source}: the rows have Pick-a-Pic's columns ({', '.join(PICK_A_PIC_COLUMNS)}), not "
                         f"{', '.join(expected)}; set data.format: pick_a_pic")


def records_from_rows(
    rows: Sequence[dict] | Any,
    *,
    source: str,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    bin_field: Optional[str] = None,
    base_dir: Optional[Path] = None,
) -> list[GroupRecord]:
    """Rows (dicts, or a ``datasets.Dataset``) → records; a single image in a field counts as a group of one."""
    records = []
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"  # 1-based, like the text side
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a mapping of field -> value, got {type(row).__name__}")
        if index == 0:
            check_not_pick_a_pic(list(row), (prompt_field, chosen_field, rejected_field), source)
        for name in (prompt_field, chosen_field, rejected_field) + ((bin_field,) if bin_field else ()):
            if name not in row or row[name] is None:
                raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
        prompt = row[prompt_field]
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field {prompt_field!r} must be a string; got {type(prompt).__name__}")
        chosen, rejected = _as_list(row[chosen_field]), _as_list(row[rejected_field])
        for name, members in ((chosen_field, chosen), (rejected_field, rejected)):
            if not members:
                raise ValueError(f"{where}: field {name!r} is an empty list; every group needs at least one image")
        bin_value = None
        if bin_field:
            bin_value = row[bin_field]
            if isinstance(bin_value, bool) or not isinstance(bin_value, (int, np.integer)):
                raise ValueError(f"{where}: field {bin_field!r} must be an integer bin id; got {bin_value!r}")
            bin_value = int(bin_value)
        records.append(GroupRecord(prompt, chosen, rejected, where, bin_value, base_dir))
    return records


def records_from_pick_a_pic(rows: Any, *, source: str = "pick-a-pic", caption_field: str = "caption") -> list[GroupRecord]:
    """Pick-a-Pic rows (``jpg_0``, ``jpg_1`` image bytes, ``label_0`` ∈ {0, 0.5, 1}, ``caption``) → pairs.

    ``label_0 = 1``: image 0 preferred; ``0``: image 1 preferred; ``0.5``: a tie, dropped (as the Diffusion-DPO
    recipe does). Returns the pairs; logs how many ties were dropped.
    """
    records, ties = [], 0
    lazy = hasattr(rows, "select_columns")  # a datasets.Dataset: read labels only, keep images in the dataset
    if lazy:
        missing = [c for c in ("jpg_0", "jpg_1", "label_0", caption_field) if c not in rows.column_names]
        if missing:
            raise ValueError(f"{source}: missing Pick-a-Pic column(s) {missing} (columns: {rows.column_names})")
    labels = rows.select_columns([c for c in ("label_0", caption_field) if c in rows.column_names]) if lazy else rows
    for index, row in enumerate(labels):
        if lazy:
            row = dict(row, jpg_0=DatasetCell(rows, index, "jpg_0"), jpg_1=DatasetCell(rows, index, "jpg_1"))
        where = f"{source} row {index + 1}"  # 1-based, like the text side
        for name in ("jpg_0", "jpg_1", "label_0", caption_field):
            if name not in row or row[name] is None:
                raise ValueError(f"{where}: missing Pick-a-Pic field {name!r} (fields present: {sorted(row)})")
        label = float(row["label_0"])
        if label == 0.5:
            ties += 1
            continue
        if label not in (0.0, 1.0):
            raise ValueError(f"{where}: field 'label_0' must be 0, 0.5 or 1; got {row['label_0']!r}")
        first, second = row["jpg_0"], row["jpg_1"]
        chosen, rejected = (first, second) if label == 1.0 else (second, first)
        where += " (chosen = jpg_0, rejected = jpg_1)" if label == 1.0 else " (chosen = jpg_1, rejected = jpg_0)"
        records.append(GroupRecord(str(row[caption_field]), [chosen], [rejected], where))
    logger.info("%s: %d pairs, %d ties dropped", source, len(records), ties)
    return records


def records_from_folder(root: str | os.PathLike) -> list[GroupRecord]:
    """``<root>/<group>/prompt.txt``, ``<root>/<group>/chosen/*``, ``<root>/<group>/rejected/*`` (sorted by name)."""
    root = Path(root)
    records = []
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        where = f"{group}"
        prompt_file = group / "prompt.txt"
        if not prompt_file.exists():
            raise ValueError(f"{where}: missing prompt.txt (expected <group>/prompt.txt, chosen/, rejected/)")
        members = {}
        for side in ("chosen", "rejected"):
            folder = group / side
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
            if not files:
                raise ValueError(f"{where}: no images in {side}/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
            members[side] = [str(p) for p in files]
        records.append(GroupRecord(prompt_file.read_text(encoding="utf-8").strip(), members["chosen"],
                                   members["rejected"], where))
    if not records:
        raise ValueError(f"{root}: no group folders found")
    return records
