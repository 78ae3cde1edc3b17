"""Decoding one image entry (path, bytes, HF dict, PIL image, array, lazy dataset cell) to a resized uint8 array."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from mmalign.image.data.records import DatasetCell


def open_image(entry: Any, base_dir: Optional[Path]) -> Image.Image:
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


def to_array(image: Any, channels: int, convert: bool) -> np.ndarray:
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


def crop_box(height: int, width: int, resolution: int, center_crop: bool) -> tuple[tuple[int, int], int, int]:
    """``((resized width, height), left, top)``: the shorter side resized to ``resolution``, then a square crop."""
    if (height, width) == (resolution, resolution):
        return (width, height), 0, 0
    scale = resolution / min(height, width)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    left = (new_size[0] - resolution) // 2 if center_crop else 0
    top = (new_size[1] - resolution) // 2 if center_crop else 0
    return new_size, left, top


def micro_conditioning(height: int, width: int, resolution: int, center_crop: bool, flip: bool) -> list[float]:
    """SDXL's per-image ``(original h, w, crop top, left)``: the image's size as decoded and the top-left corner of
    the crop in the resized image (as the SDXL training scripts record it; a flip mirrors the left edge)."""
    (new_width, _), left, top = crop_box(height, width, resolution, center_crop)
    if flip:
        left = new_width - resolution - left
    return [float(height), float(width), float(top), float(left)]


def resize_crop(array: np.ndarray, resolution: int, center_crop: bool) -> np.ndarray:
    height, width = array.shape[:2]
    if (height, width) == (resolution, resolution):
        return array
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    new_size, left, top = crop_box(height, width, resolution, center_crop)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image)
    return array if array.ndim == 3 else array[..., None]
