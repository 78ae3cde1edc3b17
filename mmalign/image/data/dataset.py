"""The lazily decoding image preference dataset, its optional VAE latent cache and the group collate function."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from mmalign.image.data.decoding import micro_conditioning, open_image, resize_crop, to_array
from mmalign.image.data.records import GroupRecord


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
        record_geometry: bool = False,
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
        # SDXL micro-conditioning: each image's original size and crop corner (GEOMETRY_KEYS) in every item
        self.record_geometry = record_geometry
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
        return self.load_image_and_geometry(index, side, member, flip=flip)[0]

    def load_image_and_geometry(self, index: int, side: str, member: int, *, flip: bool = False
                                ) -> tuple[Tensor, list[float]]:
        """:meth:`load_image` and the image's ``(original h, w, crop top, left)`` (SDXL's micro-conditioning)."""
        record = self.records[index]
        entry = getattr(record, side)[member]
        label = f"{record.where}, field {side!r}[{member}]" + (f" ({entry})" if isinstance(entry, (str, os.PathLike)) else "")
        try:
            array = to_array(open_image(entry, record.base_dir), self.channels, self.convert_images)
            geometry = micro_conditioning(*array.shape[:2], self.resolution, self.center_crop, flip)
            array = resize_crop(array, self.resolution, self.center_crop)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{label}: unreadable image ({error})") from None
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)
        return (tensor.flip(-1) if flip else tensor), geometry

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item: dict[str, Any] = {"prompt": record.prompt, "bin": record.bin}
        for side in ("chosen", "rejected"):
            count = len(getattr(record, side))
            if self.latent_cache is not None:
                item[side] = self.latent_cache.get(index, side)
                geometry = self.latent_cache.geometry.get((index, side))
            else:
                flips = (torch.rand(count) < 0.5).tolist() if self.random_flip else [False] * count
                loaded = [self.load_image_and_geometry(index, side, m, flip=flips[m]) for m in range(count)]
                item[side] = torch.stack([image for image, _ in loaded])
                geometry = torch.tensor([g for _, g in loaded])
            if self.record_geometry:
                item[f"{side}_original_sizes"], item[f"{side}_crops_top_left"] = geometry[:, :2], geometry[:, 2:]
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
        geometry: dict[tuple[int, str, int], list[float]] = {}
        for start in tqdm(range(0, len(keys), batch_size), desc="caching latents", disable=not progress):
            chunk = keys[start: start + batch_size]
            loaded = [dataset.load_image_and_geometry(*key) for key in chunk]
            geometry.update((key, g) for key, (_, g) in zip(chunk, loaded))
            pixels = torch.stack([image for image, _ in loaded])
            if device is not None:
                pixels = pixels.to(device)
            parameters = encode(pixels).cpu()
            for key, value in zip(chunk, parameters):
                encoded[key] = value
        self._groups = {}
        self.geometry: dict[tuple[int, str], Tensor] = {}  # per group: [k, 4] original h, w, crop top, left
        for i in range(len(dataset)):
            for side in ("chosen", "rejected"):
                count = len(getattr(dataset.records[i], side))
                self._groups[(i, side)] = torch.stack([encoded[(i, side, m)] for m in range(count)])
                self.geometry[(i, side)] = torch.tensor([geometry[(i, side, m)] for m in range(count)])
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
        for key in (f"{side}_original_sizes", f"{side}_crops_top_left"):  # SDXL micro-conditioning, [B, k, 2]
            if key in items[0]:
                values = torch.zeros(len(groups), k, 2)
                for row, item in enumerate(items):
                    values[row, : item[key].shape[0]] = item[key]
                batch[key] = values
    bins = [item.get("bin") for item in items]
    if all(b is not None for b in bins):
        batch["bins"] = torch.tensor(bins, dtype=torch.long)
    return batch
