import pytest
import torch

import mpu
from mpu.random import RNGStatesTracker


def test_tracker_fork_is_a_separate_stream():
    tracker = RNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("a", 1234)
    default_draw = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        forked = torch.rand(3)
    torch.testing.assert_close(torch.rand(3), default_draw)  # the default stream did not move
    torch.manual_seed(1234)
    torch.testing.assert_close(forked, torch.rand(3))
    with tracker.fork("a"):  # the stream advanced
        assert not torch.equal(torch.rand(3), forked)
    with pytest.raises(ValueError):
        tracker.add("b", 1234)


def test_model_parallel_seed_offsets():
    mpu.model_parallel_seed(10)
    tracker = mpu.get_rng_tracker()
    with tracker.fork():
        stream = torch.rand(4)
    torch.manual_seed(10 + 2718)  # mp rank 0
    torch.testing.assert_close(stream, torch.rand(4))
    tracker.reset()


def test_missing_stream_at_mp1_uses_default():
    tracker = RNGStatesTracker()
    torch.manual_seed(3)
    with tracker.fork():
        x = torch.rand(2)
    torch.manual_seed(3)
    torch.testing.assert_close(x, torch.rand(2))


def test_checkpoint_restores_rng_for_recompute():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    mpu.model_parallel_seed(5)

    def fn(h, scale):
        with mpu.get_rng_tracker().fork():
            h = torch.nn.functional.dropout(lin(h), 0.5)
        return torch.nn.functional.dropout(h, 0.3) * scale  # default stream too

    grads = []
    for use_checkpoint in (False, True):
        mpu.model_parallel_seed(5)
        lin.zero_grad()
        x.grad = None
        y = mpu.checkpoint(fn, x, 2.0) if use_checkpoint else fn(x, 2.0)
        y.pow(2).sum().backward()
        grads.append((y.detach(), x.grad.clone(), lin.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mpu.get_rng_tracker().reset()
