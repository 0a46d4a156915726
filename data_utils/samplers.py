"""Data-parallel index samplers: a per-epoch reshuffle, eval that sees every example once, mid-epoch resume.

The original trained with a ``RandomSampler`` whose epoch was never set (the same order every epoch) and evaluated
with ``drop_last=True``, so up to one global batch of dev/test examples was never scored
(``reference/original-toolkit.md`` §5.1, SPEC §10). Here:

- the epoch order is ``torch.randperm(n)`` from a ``torch.Generator`` seeded with ``seed + epoch`` (identical on
  every rank, different every epoch, reproducible per seed), or ``0..n-1`` when ``shuffle=False``;
- rank ``r`` takes the strided slice ``order[r::dp_size]`` of that epoch order;
- ``drop_last=True`` truncates the order to a multiple of ``dp_size`` (equal counts, the tail changes with the
  shuffle); with ``drop_last=False`` a training sampler pads by wrapping around (equal counts, a few examples twice,
  as ``torch.utils.data.DistributedSampler``) while an eval sampler yields every example exactly once across ranks,
  so rank counts may differ by one: the eval loop must gather per-rank results (use the batch's ``index``) and must
  not assume equal step counts. Which of the two is chosen by ``equal_counts`` (default: ``shuffle``, since
  training shuffles and evaluation does not). Unequal counts in training would make one rank wait forever in an
  all-reduce the others never join;
- ``state_dict()`` is ``{"epoch", "position", "n", "dp_size"}`` where ``position`` counts the samples this rank has
  handed out in the current epoch; ``load_state_dict`` makes the next ``__iter__`` continue at that position.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["DistributedSampler", "BatchSampler", "batches"]


class DistributedSampler:
    """Yields this DP rank's dataset indices for the current epoch; resumable mid-epoch.

    Iteration semantics: ``__iter__`` starts at the saved ``position`` of the current epoch and advances it for
    every index handed out. When a pass runs to the end, the sampler moves itself to ``epoch + 1``, position 0
    (so a checkpoint taken between epochs resumes with the next epoch, and a second pass reshuffles even if the
    caller forgets ``set_epoch``). ``set_epoch(e)`` with ``e`` different from the current epoch resets the
    position to 0; with the current epoch it keeps the position, so a resumed loop may call it unconditionally.

    With a prefetching ``DataLoader`` the sampler runs ahead of the training step (by ``num_workers *
    prefetch_factor`` batches); a trainer that needs the exact consumed count should store its own count and
    restore it with ``load_state_dict({"epoch": e, "position": samples_consumed_on_this_rank})``.
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = False,
        equal_counts: bool | None = None,
    ):
        if n < 0:
            raise ValueError(f"DistributedSampler: n={n} must be >= 0")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"DistributedSampler: dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if drop_last and 0 < n < dp_size:
            raise ValueError(
                f"DistributedSampler: with drop_last=True, {n} examples leave nothing for {dp_size} DP ranks; "
                "use fewer ranks or drop_last=False"
            )
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last
        # Training needs equal per-rank counts (collectives); evaluation needs each example exactly once.
        self.equal_counts = shuffle if equal_counts is None else equal_counts
        self.epoch = 0
        self.position = 0
        self._cached_epoch: int | None = None
        self._cached_indices: list[int] = []

    def _global_length(self) -> int:
        if self.drop_last:
            return (self.n // self.dp_size) * self.dp_size
        if self.equal_counts:
            return math.ceil(self.n / self.dp_size) * self.dp_size
        return self.n

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch (independent of the current position)."""
        total = self._global_length()
        return len(range(self.dp_rank, total, self.dp_size))

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (all ranks), after truncation or wrap-padding; ranks stride over it."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            base = torch.randperm(self.n, generator=generator).tolist()
        else:
            base = list(range(self.n))
        total = self._global_length()
        if total <= len(base):
            return base[:total]
        # Wrap-around padding; cyclic so that it also works when the padding exceeds n (n < dp_size).
        return [base[i % self.n] for i in range(total)]

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for ``epoch`` (default: current), ignoring the position."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached_epoch != epoch:
            self._cached_indices = self.epoch_order(epoch)[self.dp_rank :: self.dp_size]
            self._cached_epoch = epoch
        return self._cached_indices

    def __iter__(self) -> Iterator[int]:
        epoch_indices = self.indices()
        while self.position < len(epoch_indices):
            index = epoch_indices[self.position]
            # Count before yielding: once the consumer holds the index, it is consumed.
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``epoch`` and ``position``; ``n`` / ``dp_size``, when present, must match this sampler."""
        for key in ("n", "dp_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    "the saved position does not apply (resume with the same data and DP size, or drop the "
                    "sampler state to restart the epoch)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"sampler state epoch={epoch}, position={position} out of range (len {len(self)})")
        self.epoch, self.position = epoch, position


def batches(indices: Iterable[int], batch_size: int, drop_last: bool) -> Iterator[list[int]]:
    """Group an index stream into lists of ``batch_size``; the last short batch is kept unless ``drop_last``."""
    if batch_size < 1:
        raise ValueError(f"batches: batch_size={batch_size} must be >= 1")
    batch: list[int] = []
    for index in indices:
        batch.append(index)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


class BatchSampler:
    """Re-iterable ``batches`` over a sampler, usable as ``DataLoader(dataset, batch_sampler=...)``.

    ``len`` counts the batches of a full epoch (not the remaining ones after a resume).
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"BatchSampler: batch_size={batch_size} must be >= 1")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        return batches(self.sampler, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
