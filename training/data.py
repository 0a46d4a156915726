"""Glue between `data_utils` datasets/samplers and torch DataLoaders, for training and evaluation.

Training order comes from the sampler (reshuffled every epoch from seed + epoch); resuming mid-epoch skips the
micro-batches already consumed, so the resumed run sees exactly the batches the uninterrupted one would.
Evaluation shards every example over data-parallel ranks exactly once (no drop_last, no padding duplicates).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from data_utils.samplers import DistributedSampler


def _chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[i:i + size] for i in range(0, len(indices), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


def _loader(dataset, batch_index_lists: list[list[int]], collate: Callable, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_index_lists, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=False)


class TrainBatches:
    """`(epoch, skip) -> iterator of collated micro-batches` for one data-parallel rank."""

    def __init__(self, dataset, collate: Callable, *, batch_size: int, seed: int, dp_rank: int, dp_size: int,
                 num_workers: int):
        self.dataset = dataset
        self.collate = collate
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = DistributedSampler(len(dataset), shuffle=True, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                                          drop_last=True)
        self.micro_batches_per_epoch = len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        self.sampler.load_state_dict({"epoch": epoch, "position": 0})
        return _chunks(list(iter(self.sampler)), self.batch_size, drop_last=True)

    def __call__(self, epoch: int, skip: int) -> Iterator[dict]:
        batches = self._epoch_batches(epoch)[skip:]
        if not batches:
            return iter(())
        return iter(_loader(self.dataset, batches, self.collate, self.num_workers))


class EvalBatches:
    """A re-iterable over this rank's share of an evaluation set, in dataset order."""

    def __init__(self, dataset, collate: Callable, *, batch_size: int, dp_rank: int, dp_size: int, num_workers: int):
        sampler = DistributedSampler(len(dataset), shuffle=False, seed=0, dp_rank=dp_rank, dp_size=dp_size,
                                     drop_last=False)
        self.batches = _chunks(list(iter(sampler)), batch_size, drop_last=False)
        self.dataset = dataset
        self.collate = collate
        self.num_workers = num_workers

    def __call__(self) -> Iterator[tuple[dict, list[int]]]:
        if not self.batches:
            return iter(())
        loader = _loader(self.dataset, self.batches, self.collate, self.num_workers)
        return ((batch, _indices(batch, idx)) for batch, idx in zip(loader, self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def _indices(batch: dict, fallback: list[int]) -> list[int]:
    index = batch.get("index")
    return index.tolist() if torch.is_tensor(index) else list(fallback)
