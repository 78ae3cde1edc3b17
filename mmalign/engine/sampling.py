"""The seeded per-epoch data order of the training loop."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A permutation of the dataset per epoch from ``seed + epoch`` (or the identity when not shuffling).

    Its own generator keeps the data order independent of the global RNG, so resuming mid-epoch replays the
    same order, and model-side randomness (dropout) never shifts the data order.
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())
