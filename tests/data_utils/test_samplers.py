"""data_utils/samplers.py: per-epoch reshuffle, eval coverage, equal training counts, mid-epoch resume."""
import itertools

import pytest
import torch

from data_utils.samplers import BatchSampler, DistributedSampler, batches


def _ranks(n, dp_size, **kwargs):
    return [DistributedSampler(n, dp_rank=r, dp_size=dp_size, **kwargs) for r in range(dp_size)]


def test_reshuffles_every_epoch_and_is_deterministic_per_seed():
    s = DistributedSampler(50, shuffle=True, seed=7, dp_rank=0, dp_size=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1
    again = DistributedSampler(50, shuffle=True, seed=7, dp_rank=0, dp_size=1)
    assert list(again) == e0
    other_seed = DistributedSampler(50, shuffle=True, seed=8, dp_rank=0, dp_size=1)
    assert list(other_seed) != e0
    # the permutation is torch.randperm seeded with seed + epoch
    g = torch.Generator().manual_seed(7 + 1)
    assert e1 == torch.randperm(50, generator=g).tolist()


def test_completed_pass_advances_epoch_so_forgetting_set_epoch_still_reshuffles():
    s = DistributedSampler(20, shuffle=True, seed=0, dp_rank=0, dp_size=1)
    first = list(s)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0
    assert list(s) != first
    s.set_epoch(1)  # the loop's own set_epoch agrees with the automatic advance: no reset to a replay
    assert s.epoch == 1


@pytest.mark.parametrize("n, dp_size", [(10, 3), (7, 4), (3, 4), (1, 2), (0, 2), (12, 4)])
def test_eval_covers_every_example_exactly_once(n, dp_size):
    samplers = _ranks(n, dp_size, shuffle=False, seed=0, drop_last=False)
    seen = list(itertools.chain.from_iterable(list(s) for s in samplers))
    assert sorted(seen) == list(range(n))  # no duplicates, nothing dropped
    counts = [len(s) for s in samplers]
    assert max(counts) - min(counts) <= (1 if n % dp_size else 0)  # unequal counts allowed (documented)
    assert sum(counts) == n


def test_training_drop_last_gives_equal_counts():
    samplers = _ranks(10, 3, shuffle=True, seed=1, drop_last=True)
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [3, 3, 3]
    flat = list(itertools.chain.from_iterable(per_rank))
    assert len(set(flat)) == 9  # disjoint ranks


def test_training_without_drop_last_pads_to_equal_counts():
    samplers = _ranks(10, 4, shuffle=True, seed=1, drop_last=False)
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [3, 3, 3, 3]
    assert set(itertools.chain.from_iterable(per_rank)) == set(range(10))  # 2 examples repeated, none lost
    # tiny data with more ranks than examples still gives every rank one example
    assert [len(list(s)) for s in _ranks(2, 4, shuffle=True, seed=0, drop_last=False)] == [1, 1, 1, 1]


def test_equal_counts_can_be_forced_for_unshuffled_training():
    samplers = _ranks(10, 4, shuffle=False, seed=0, drop_last=False, equal_counts=True)
    assert [len(s) for s in samplers] == [3, 3, 3, 3]


def test_resume_mid_epoch_continues_the_same_order():
    reference = DistributedSampler(37, shuffle=True, seed=3, dp_rank=1, dp_size=2)
    reference.set_epoch(2)
    full = list(reference)

    s = DistributedSampler(37, shuffle=True, seed=3, dp_rank=1, dp_size=2)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state == {"epoch": 2, "position": 5, "n": 37, "dp_size": 2}

    resumed = DistributedSampler(37, shuffle=True, seed=3, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a resumed loop calling set_epoch with the saved epoch keeps the position
    assert head + list(resumed) == full
    assert resumed.state_dict()["epoch"] == 3


def test_resume_through_batches():
    s = DistributedSampler(23, shuffle=True, seed=0, dp_rank=0, dp_size=1)
    loader = BatchSampler(s, batch_size=4, drop_last=False)
    it = iter(loader)
    first_two = [next(it), next(it)]
    resumed = DistributedSampler(23, shuffle=True, seed=0, dp_rank=0, dp_size=1)
    resumed.load_state_dict(s.state_dict())
    rest = list(BatchSampler(resumed, batch_size=4, drop_last=False))
    fresh = list(BatchSampler(DistributedSampler(23, shuffle=True, seed=0, dp_rank=0, dp_size=1), 4, False))
    assert first_two + rest == fresh
    assert len(loader) == 6 and len(BatchSampler(s, 4, drop_last=True)) == 5


def test_load_state_dict_refuses_a_different_layout():
    s = DistributedSampler(10, shuffle=True, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_size=4"):
        s.load_state_dict({"epoch": 1, "position": 2, "n": 10, "dp_size": 4})
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({"epoch": 1, "position": 99})
    s.load_state_dict({"epoch": 1, "position": 2})  # minimal {epoch, position} form is accepted
    assert s.state_dict()["position"] == 2


def test_argument_errors():
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedSampler(10, shuffle=False, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="drop_last"):
        DistributedSampler(3, shuffle=True, seed=0, dp_rank=0, dp_size=4, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        list(batches([1, 2], 0, False))


def test_batches():
    assert list(batches(range(7), 3, drop_last=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batches(range(7), 3, drop_last=True)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batches([], 3, drop_last=False)) == []


def test_works_as_dataloader_batch_sampler():
    data = list(range(100, 111))
    s = DistributedSampler(len(data), shuffle=False, seed=0, dp_rank=0, dp_size=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=BatchSampler(s, 4, False), collate_fn=list)
    assert list(itertools.chain.from_iterable(loader)) == data
