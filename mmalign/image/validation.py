"""Every image of an image preference dataset checked before the first step, cheaply: headers, sizes and ends.

Decoding stays lazy (:class:`~mmalign.image.data.ImagePreferenceDataset`), so without this a missing file, a
truncated PNG, a text file named ``.png`` or a grayscale image without ``data.convert_images`` stopped a run
mid-training. Here each entry is opened for its header only (format, mode, size); a PNG's chunks are walked to
``IEND`` (a seek per chunk, no inflation), a JPEG must end with its EOI marker, other formats are ``verify()``-ed.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
from PIL import Image

__all__ = ["check_image_records", "image_problem"]

_MAX_LISTED = 5


def _png_complete(handle: BinaryIO) -> bool:
    handle.seek(8)
    while True:
        header = handle.read(8)
        if len(header) < 8:
            return False
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return True
        handle.seek(length + 4, io.SEEK_CUR)  # data + CRC


def _jpeg_complete(handle: BinaryIO) -> bool:
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 1024))
    return handle.read().rstrip(b"\0\r\n ").endswith(b"\xff\xd9")


def _channels_problem(mode: str, channels: int, convert: bool) -> Optional[str]:
    try:  # the channel count the dataset's decoder sees (palette and 16-bit modes: 1)
        found = Image.getmodebands(mode)
    except (KeyError, ValueError):
        return f"has an unsupported mode {mode!r}"
    if found != channels and not (convert and channels in (1, 3)):
        target = {1: "L", 3: "RGB"}.get(channels, channels)
        return (f"has {found} channel(s) (mode {mode}), the model takes {channels}; set data.convert_images: true "
                f"to convert to {target}")
    return None


def _file_problem(handle: BinaryIO, channels: int, convert: bool) -> Optional[str]:
    try:
        with Image.open(handle) as image:
            kind, mode, (width, height) = image.format, image.mode, image.size
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad headers
        return f"not a readable image ({type(err).__name__}: {err})"
    if width < 1 or height < 1:
        return f"has size {width}x{height}"
    if kind == "PNG":
        complete = _png_complete(handle)
    elif kind in ("JPEG", "MPO"):
        complete = _jpeg_complete(handle)
    else:
        try:
            handle.seek(0)
            with Image.open(handle) as image:
                image.verify()
            complete = True
        except Exception:
            complete = False
    if not complete:
        return f"truncated {kind} file (its end is missing)"
    return _channels_problem(mode, channels, convert)


def image_problem(entry: Any, base_dir: Optional[Path], channels: int, convert: bool) -> Optional[str]:
    """What is wrong with one image entry (path, bytes, HF dict, PIL image, array), or None."""
    from mmalign.image.data.records import DatasetCell

    if isinstance(entry, DatasetCell):
        entry = entry.resolve()
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
        if entry is None:
            return "image dict has neither 'bytes' nor 'path'"
    if isinstance(entry, Image.Image):
        return _channels_problem(entry.mode, channels, convert)
    if isinstance(entry, np.ndarray):
        if entry.ndim not in (2, 3) or entry.dtype != np.uint8:
            return f"array image must be uint8 [H, W] or [H, W, C]; got {entry.dtype} of shape {entry.shape}"
        found = 1 if entry.ndim == 2 else entry.shape[-1]
        if found != channels and not (convert and channels == 3 and found in (1, 4)):
            return f"has {found} channels, the model takes {channels}"
        return None
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return _file_problem(io.BytesIO(bytes(entry)), channels, convert)
    if isinstance(entry, (str, os.PathLike)):
        file = Path(entry)
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file
        if not file.is_file():
            return f"file {file} does not exist"
        with open(file, "rb") as handle:
            return _file_problem(handle, channels, convert)
    return f"unsupported image entry of type {type(entry).__name__}"


def check_image_records(dataset: Any) -> None:
    """Checks every image of ``dataset`` (an ``ImagePreferenceDataset``); a ValueError lists the first problems,
    each with its row, field and member, and how many images are bad in all."""
    problems = []
    for record in dataset.records:
        for side in ("chosen", "rejected"):
            for member, entry in enumerate(getattr(record, side)):
                problem = image_problem(entry, record.base_dir, dataset.channels, dataset.convert_images)
                if problem is not None:
                    shown = f" ({entry})" if isinstance(entry, (str, os.PathLike)) else ""
                    problems.append(f"{record.where}, field {side!r}[{member}]{shown}: {problem}")
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{len(problems)} bad image(s), found before training:\n  {listed}{more}")
