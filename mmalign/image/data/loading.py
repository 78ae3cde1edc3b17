"""``load_group_records``: records from a path (JSONL, Parquet, ``datasets`` name or folder) or from objects."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from mmalign.image.data.records import (
    GroupRecord,
    records_from_dataset,
    records_from_folder,
    records_from_pick_a_pic,
    records_from_rows,
)
from mmalign.io import read_jsonl


def load_group_records(
    source: Any,
    *,
    format: str = "groups",
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    bin_field: Optional[str] = None,
    max_samples: Optional[int] = None,
    name: str = "data.train",
) -> list[GroupRecord]:
    """Records from a JSONL/Parquet file, a group folder, ``datasets.load_dataset(source, split=split)``, or
    in-memory data: a ``datasets.Dataset``, a ``DatasetDict`` (its ``split``) or a list of dicts whose image
    cells are PIL images, uint8 arrays, bytes or paths. Every row is checked; ``name`` names in-memory data in
    errors."""
    if format not in ("groups", "pick_a_pic"):
        raise ValueError(f"data.format {format!r}: expected 'groups' or 'pick_a_pic'")
    fields = dict(prompt_field=prompt_field, chosen_field=chosen_field, rejected_field=rejected_field,
                  bin_field=bin_field)
    if not isinstance(source, (str, os.PathLike)):
        return _records_from_objects(source, format=format, split=split, max_samples=max_samples, name=name, **fields)
    path = str(source)
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or local.suffix.lower() in (".jsonl", ".json",
                                                                                             ".parquet")):
        raise FileNotFoundError(f"{name}: {path} does not exist (a JSONL / Parquet file, a group folder, or a "
                                "datasets folder or hub name)")
    if local.is_file() and local.suffix in (".jsonl", ".json"):
        rows = read_jsonl(local)[: max_samples]
        if format == "pick_a_pic":
            return records_from_pick_a_pic(rows, source=str(local), caption_field=prompt_field)
        return records_from_rows(rows, source=str(local), base_dir=local.parent, **fields)
    if local.is_dir() and format == "groups" and any((p / "prompt.txt").exists() for p in local.iterdir() if p.is_dir()):
        return records_from_folder(local)[: max_samples]
    import datasets

    if local.is_file() and local.suffix == ".parquet":
        dataset = datasets.load_dataset("parquet", data_files=str(local), split="train")
        base_dir = local.parent
    elif local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(local))  # a save_to_disk folder
        if isinstance(dataset, datasets.DatasetDict):
            dataset = _split_of(dataset, split, name)
        base_dir = local
    else:
        dataset = datasets.load_dataset(path, split=split)
        base_dir = local if local.is_dir() else None
    return _records_from_dataset_object(dataset, format=format, max_samples=max_samples, source=path,
                                        base_dir=base_dir, **fields)


def _split_of(dataset_dict: Any, split: str, name: str) -> Any:
    if split not in dataset_dict:
        raise ValueError(f"{name}: no split {split!r}; available: {', '.join(map(str, dataset_dict))}")
    return dataset_dict[split]


def _records_from_dataset_object(dataset: Any, *, format: str, max_samples: Optional[int], source: str,
                                 base_dir: Optional[Path], **fields: Any) -> list[GroupRecord]:
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if format == "pick_a_pic":
        prompt_field = fields["prompt_field"]
        caption = prompt_field if prompt_field in dataset.column_names else "caption"
        return records_from_pick_a_pic(dataset, source=source, caption_field=caption)
    return records_from_dataset(dataset, source=source, base_dir=base_dir, **fields)


def _records_from_objects(data: Any, *, format: str, split: str, max_samples: Optional[int], name: str,
                          **fields: Any) -> list[GroupRecord]:
    if isinstance(data, dict) and data and all(hasattr(v, "column_names") for v in data.values()):  # DatasetDict
        data = _split_of(data, split, name)
    if hasattr(data, "column_names") and hasattr(data, "select"):  # datasets.Dataset
        return _records_from_dataset_object(data, format=format, max_samples=max_samples,
                                            source=f"{name} (Dataset)", base_dir=None, **fields)
    if isinstance(data, (list, tuple)):
        rows = list(data)[:max_samples]
        source = f"{name} (list)"
        if format == "pick_a_pic":
            return records_from_pick_a_pic(rows, source=source, caption_field=fields["prompt_field"])
        return records_from_rows(rows, source=source, base_dir=None, **fields)
    raise ValueError(f"{name}: expected a path, a datasets.Dataset or DatasetDict, or a list of dicts; got "
                     f"{type(data).__name__}")
