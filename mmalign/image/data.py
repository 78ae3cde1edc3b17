"""Image preference data: groups ``{prompt, chosen: [images], rejected: [images]}`` (a pair is a group of one).

Sources (:func:`load_group_records`):

- a JSONL file (``.jsonl``/``.json``): one object per line; image entries are paths relative to the file;
- a Parquet file or a ``datasets`` name/folder (``load_dataset(path, split=...)``): image entries may be
  ``datasets.Image`` values (PIL), ``{"bytes", "path"}`` dicts, raw bytes, or paths;
- a folder of groups: ``<root>/<group>/prompt.txt`` + ``<root>/<group>/chosen/*`` + ``<root>/<group>/rejected/*``;
- Pick-a-Pic (``format="pick_a_pic"``): rows ``{caption, jpg_0, jpg_1, label_0}`` → pairs, ties (label 0.5) dropped.

Images are decoded lazily by :class:`ImagePreferenceDataset` (resize, crop, optional flip, → ``[-1, 1]``). A bad
image — unreadable, wrong channel count — raises ``ValueError`` naming the source, row (numbered from 1), field and member.
Optional latent caching (:class:`LatentCache`) encodes every image once with the VAE and reuses it across epochs.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from mmalign.io import read_jsonl

__all__ = [
    "GroupRecord",
    "load_group_records",
    "records_from_rows",
    "records_from_dataset",
    "DatasetCell",
    "records_from_pick_a_pic",
    "records_from_folder",
    "ImagePreferenceDataset",
    "LatentCache",
    "collate_groups",
    "IMAGE_EXTENSIONS",
]

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


# ------------------------------------------------------------------------------------------------------ decoding


def _open_image(entry: Any, base_dir: Optional[Path]) -> Image.Image:
    if isinstance(entry, DatasetCell):
        entry = entry.resolve()
    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, np.ndarray):
        array = entry
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"array image must be [H, W] or [H, W, C]; got shape {entry.shape}")
        if array.dtype != np.uint8:
            raise ValueError(f"array image must be uint8; got {array.dtype}")
        return array  # type: ignore[return-value]  (channel check happens on the array)
    if isinstance(entry, dict):
        if entry.get("bytes"):
            entry = entry["bytes"]
        elif entry.get("path"):
            entry = entry["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(entry)))
        image.load()
        return image
    if isinstance(entry, (str, os.PathLike)):
        file = Path(entry)
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file
        if not file.exists():
            raise ValueError(f"file {file} does not exist")
        image = Image.open(file)
        image.load()
        return image
    raise ValueError(f"unsupported image entry of type {type(entry).__name__}")


_MODE_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "I;16": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3,
                  "HSV": 3, "RGBA": 4, "CMYK": 4}


def _to_array(image: Any, channels: int, convert: bool) -> np.ndarray:
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 3 else image[..., None]
        if array.shape[-1] != channels:
            if convert and channels == 3 and array.shape[-1] in (1, 4):
                array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
            else:
                raise ValueError(f"has {array.shape[-1]} channels, the model takes {channels}")
        return array
    found = _MODE_CHANNELS.get(image.mode, len(image.getbands()))
    if found != channels or image.mode in ("P", "YCbCr", "LAB", "HSV", "CMYK", "I", "F", "I;16"):
        target = {1: "L", 3: "RGB"}.get(channels)
        if convert and target:
            image = image.convert(target)
        elif found != channels:
            raise ValueError(
                f"has {found} channel(s) (mode {image.mode}), the model takes {channels}; "
                f"set data.convert_images: true to convert to {target or channels}"
            )
        else:
            image = image.convert(target) if target else image
    array = np.asarray(image)
    return array if array.ndim == 3 else array[..., None]


def _resize_crop(array: np.ndarray, resolution: int, center_crop: bool) -> np.ndarray:
    height, width = array.shape[:2]
    if (height, width) == (resolution, resolution):
        return array
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    scale = resolution / min(height, width)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - resolution) // 2 if center_crop else 0
    top = (new_size[1] - resolution) // 2 if center_crop else 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image)
    return array if array.ndim == 3 else array[..., None]


class ImagePreferenceDataset(torch.utils.data.Dataset):
    """Decodes records into ``{"prompt", "chosen" [k_w, C, H, W], "rejected" [k_l, C, H, W], "bin"}`` in [-1, 1].

    Args:
        records: from :func:`load_group_records`.
        resolution: square side the images are resized (shorter side) and cropped to.
        channels: channels the model takes (3 for RGB).
        center_crop: center crop (else top-left).
        random_flip: flip each image horizontally with probability 1/2 (torch RNG: resumable).
        convert_images: convert other modes (grayscale, RGBA, palette) instead of raising.
        allow_ragged_groups: allow different group sizes across rows (padded + masked in a batch); otherwise every
            row must have the first row's (k_w, k_l).
        latent_cache: serve cached VAE posterior parameters instead of pixels (see :class:`LatentCache`).
    """

    def __init__(
        self,
        records: list[GroupRecord],
        *,
        resolution: int,
        channels: int = 3,
        center_crop: bool = True,
        random_flip: bool = False,
        convert_images: bool = False,
        allow_ragged_groups: bool = False,
    ):
        if not records:
            raise ValueError("ImagePreferenceDataset: no records")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8; got {resolution}")
        self.records = records
        self.resolution = resolution
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.convert_images = convert_images
        self.latent_cache: Optional[LatentCache] = None
        if not allow_ragged_groups:
            expected = (len(records[0].chosen), len(records[0].rejected))
            for record in records:
                sizes = (len(record.chosen), len(record.rejected))
                if sizes != expected:
                    raise ValueError(
                        f"{record.where}: group sizes (chosen {sizes[0]}, rejected {sizes[1]}) differ from the first "
                        f"row's (chosen {expected[0]}, rejected {expected[1]}); set data.allow_ragged_groups: true "
                        "to train on ragged groups (an objective that accepts groups, e.g. mdpo, is then needed)"
                    )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def max_group_sizes(self) -> tuple[int, int]:
        return max(len(r.chosen) for r in self.records), max(len(r.rejected) for r in self.records)

    def load_image(self, index: int, side: str, member: int, *, flip: bool = False) -> Tensor:
        """One image as ``[C, H, W]`` float in [-1, 1]; a bad one raises naming row, field and member."""
        record = self.records[index]
        entry = getattr(record, side)[member]
        label = f"{record.where}, field {side!r}[{member}]" + (f" ({entry})" if isinstance(entry, (str, os.PathLike)) else "")
        try:
            array = _to_array(_open_image(entry, record.base_dir), self.channels, self.convert_images)
            array = _resize_crop(array, self.resolution, self.center_crop)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{label}: unreadable image ({error})") from None
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)
        return tensor.flip(-1) if flip else tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item: dict[str, Any] = {"prompt": record.prompt, "bin": record.bin}
        for side in ("chosen", "rejected"):
            count = len(getattr(record, side))
            if self.latent_cache is not None:
                item[side] = self.latent_cache.get(index, side)
                continue
            flips = (torch.rand(count) < 0.5).tolist() if self.random_flip else [False] * count
            item[side] = torch.stack([self.load_image(index, side, m, flip=flips[m]) for m in range(count)])
        item["inputs"] = "latent_parameters" if self.latent_cache is not None else "pixels"
        return item


class LatentCache:
    """Every image of a dataset encoded once by the VAE; ``get`` serves the posterior mean ‖ std per group.

    Storing the posterior parameters (not one sample) keeps training statistically identical to encoding on
    the fly: the model draws a fresh latent from the cached posterior at every use. Incompatible with
    ``random_flip`` (the flip happens before the VAE).
    """

    def __init__(self, dataset: ImagePreferenceDataset, encode: Callable[[Tensor], Tensor], *, batch_size: int = 16,
                 device: Optional[torch.device] = None, progress: bool = True):
        from tqdm.auto import tqdm

        if dataset.random_flip:
            raise ValueError("data.cache_latents is incompatible with data.random_flip (flips happen before the VAE)")
        keys = [(i, side, m) for i in range(len(dataset)) for side in ("chosen", "rejected")
                for m in range(len(getattr(dataset.records[i], side)))]
        encoded: dict[tuple[int, str, int], Tensor] = {}
        for start in tqdm(range(0, len(keys), batch_size), desc="caching latents", disable=not progress):
            chunk = keys[start: start + batch_size]
            pixels = torch.stack([dataset.load_image(*key) for key in chunk])
            if device is not None:
                pixels = pixels.to(device)
            parameters = encode(pixels).cpu()
            for key, value in zip(chunk, parameters):
                encoded[key] = value
        self._groups = {}
        for i in range(len(dataset)):
            for side in ("chosen", "rejected"):
                count = len(getattr(dataset.records[i], side))
                self._groups[(i, side)] = torch.stack([encoded[(i, side, m)] for m in range(count)])
        self.num_images = len(keys)

    def get(self, index: int, side: str) -> Tensor:
        return self._groups[(index, side)]


def collate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pads groups to the batch's largest k (zeros) with boolean masks; ``bins`` only when every item has one."""
    batch: dict[str, Any] = {"prompts": [item["prompt"] for item in items]}
    inputs = {item["inputs"] for item in items}
    if len(inputs) != 1:
        raise ValueError(f"a batch mixes input kinds {sorted(inputs)}")
    batch["inputs"] = inputs.pop()
    for side in ("chosen", "rejected"):
        groups = [item[side] for item in items]
        k = max(group.shape[0] for group in groups)
        shape = groups[0].shape[1:]
        padded = groups[0].new_zeros((len(groups), k) + tuple(shape))
        mask = torch.zeros(len(groups), k, dtype=torch.bool)
        for row, group in enumerate(groups):
            if tuple(group.shape[1:]) != tuple(shape):
                raise ValueError(f"batch item {row}: {side} images of shape {tuple(group.shape[1:])}, expected {tuple(shape)}")
            padded[row, : group.shape[0]] = group
            mask[row, : group.shape[0]] = True
        batch[side] = padded
        batch[f"{side}_mask"] = mask
    bins = [item.get("bin") for item in items]
    if all(b is not None for b in bins):
        batch["bins"] = torch.tensor(bins, dtype=torch.long)
    return batch
