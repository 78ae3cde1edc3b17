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

from mmalign.image.data.dataset import ImagePreferenceDataset, LatentCache, collate_groups
from mmalign.image.data.loading import load_group_records
from mmalign.image.data.records import (
    IMAGE_EXTENSIONS,
    PICK_A_PIC_COLUMNS,
    DatasetCell,
    GroupRecord,
    check_not_pick_a_pic,
    records_from_dataset,
    records_from_folder,
    records_from_pick_a_pic,
    records_from_rows,
)

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
    "PICK_A_PIC_COLUMNS",
    "check_not_pick_a_pic",
]
