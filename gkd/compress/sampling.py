"""The trainer's data: a seeded, rank-sharded sample order that resumes mid-epoch, per-sample augmentation
seeds, and the data loader over them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from gkd.utils.runtime import DistInfo


class ResumableSampler(Sampler):
    """Seeded shuffling sharded over ranks that can restart mid-epoch.

    torch's ``DistributedSampler`` cannot resume inside an epoch, so this one keeps (epoch, position).
    It yields ``(index, sample_seed)``: each sample's augmentation is seeded by (seed, epoch, index, copy),
    making data identical whatever the worker count, the world size, or an interruption.
    Rank ``r`` takes positions ``r, r + W, ...`` of the epoch's order, so a global batch over
    ``W`` ranks holds the same samples as one process with the same global batch.
    With ``repeats > 1`` the epoch's order is timm's ``RepeatAugSampler``'s (repeated augmentation, DeiT):
    each drawn sample appears ``repeats`` times in a row, each copy with its own augmentation seed.

    Args:
        length: samples in the dataset.
        seed: seeds each epoch's order and each sample's augmentation.
        info: this process's rank and the world size.
        repeats: copies of each drawn sample (repeated augmentation); 1 = off.
    """

    def __init__(self, length: int, seed: int, info: DistInfo, repeats: int = 1) -> None:
        self.length, self.seed, self.info, self.repeats = length, seed, info, repeats
        self.epoch = 0
        self.position = 0

    def _indices(self) -> list[tuple[int, int]]:
        """``(index, copy)`` pairs of this rank for the epoch; ``copy`` counts earlier draws of the index."""
        if self.repeats == 1:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            repeated = RepeatAugSampler(range(self.length), num_replicas=1, rank=0, num_repeats=self.repeats)
            repeated.set_epoch(self.seed + self.epoch)
            order = list(repeated)
        seen: Counter[int] = Counter()
        pairs = []
        for index in order:
            pairs.append((index, seen[index]))
            seen[index] += 1
        usable = len(pairs) - len(pairs) % self.info.world_size
        return pairs[self.info.rank : usable : self.info.world_size]

    def __len__(self) -> int:
        return len(self._indices()) - self.position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index, copy in self._indices()[self.position :]:
            yield index, (self.seed * 1_000_003 + self.epoch * 7_919 + index + copy * 104_729) % 2**31


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` with torch/numpy/python RNGs seeded by the sampler's sample seed, without
    disturbing the caller's RNG streams."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, sample_seed = key
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            np.random.seed(sample_seed)
            random.seed(sample_seed)
            sample = self.dataset[index]
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        return sample


def build_loader(
    dataset: Dataset, micro_batch: int, sampler: ResumableSampler, workers: int, device: torch.device, seed: int
) -> DataLoader:
    """The trainer's data loader: seeded samples, pinned memory on CUDA, workers that persist for the whole
    stage (with any in-memory cache they fill) and keep 4 batches each in flight.

    Args:
        dataset: samples as dicts of tensors.
        micro_batch: samples per batch on this rank.
        sampler: yields ``(index, sample_seed)``.
        workers: loader worker processes (0 = load in this process).
        device: where batches go (pinned host memory for CUDA, so copies are asynchronous).
        seed: seeds the loader's own generator.
    """
    return DataLoader(
        SeededDataset(dataset),
        batch_size=micro_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # its own generator: creating an iterator must not consume the global RNG that resume restores
        generator=torch.Generator().manual_seed(seed),
    )
