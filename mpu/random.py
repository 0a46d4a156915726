"""Device RNG streams for model parallelism and activation checkpointing (Megatron's ``random.py``).

Two streams matter (as in the original ``model_parallel_cuda_manual_seed``):
* the default device stream, seeded with ``seed`` on every rank of an MP group, drives dropout on replicated
  activations (the residual stream), so every MP rank drops the same elements;
* the named ``"model-parallel-rng"`` stream, seeded ``seed + 2718 + mp_rank``, drives dropout on sharded
  activations (attention probabilities, FF hidden), so shards get independent masks.

Devices and RNG are reached through ``deepspeed.accelerator.get_accelerator()`` (never bare ``torch.cuda``), so the
same code runs on CPU (where the "device" stream is the CPU generator) and GPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from deepspeed.accelerator import get_accelerator

from .initialize import get_model_parallel_rank, get_model_parallel_world_size

MODEL_PARALLEL_RNG = "model-parallel-rng"
_MODEL_PARALLEL_SEED_OFFSET = 2718  # the original's offset; keeps the stream distinct from the default one


class RNGStatesTracker:
    """Named device RNG states; :meth:`fork` swaps one in, runs the block, stores it advanced, restores the default."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds.add(seed)
        accelerator = get_accelerator()
        saved = accelerator.get_rng_state()
        accelerator.manual_seed(seed)
        self.states[name] = accelerator.get_rng_state()
        accelerator.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on stream ``name``.

        At MP size 1 a missing stream falls back to the default one (there are no shards to decorrelate); at
        MP > 1 it is an error, since identical masks on different shards would silently bias dropout.
        """
        if name not in self.states:
            if get_model_parallel_world_size() == 1:
                yield
                return
            raise RuntimeError(f"RNG stream {name!r} is not set; call mpu.model_parallel_seed(seed) after "
                               "mpu.initialize_model_parallel()")
        accelerator = get_accelerator()
        saved = accelerator.get_rng_state()
        accelerator.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = accelerator.get_rng_state()
            accelerator.set_rng_state(saved)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _RNG_TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed the default device stream with ``seed`` and the model-parallel stream with ``seed + 2718 + mp_rank``."""
    get_accelerator().manual_seed(seed)
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(MODEL_PARALLEL_RNG, seed + _MODEL_PARALLEL_SEED_OFFSET + get_model_parallel_rank())


def _rng_snapshot() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    return torch.get_rng_state(), get_accelerator().get_rng_state(), _RNG_TRACKER.get_states()


def _rng_restore(snapshot: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]) -> None:
    cpu_state, device_state, tracker_states = snapshot
    torch.set_rng_state(cpu_state)
    get_accelerator().set_rng_state(device_state)
    _RNG_TRACKER.set_states(tracker_states)


class _CheckpointFunction(torch.autograd.Function):
    """Run ``fn`` without keeping activations; recompute it in backward under the forward's RNG states."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Any], *args: Any):
        ctx.fn = fn
        ctx.rng = _rng_snapshot()
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        tensors = iter(ctx.saved_tensors)
        inputs = []
        for is_tensor, other in zip(ctx.is_tensor, ctx.others):
            if is_tensor:
                t = next(tensors)
                inputs.append(t.detach().requires_grad_(t.requires_grad))
            else:
                inputs.append(other)
        current = _rng_snapshot()
        _rng_restore(ctx.rng)  # same dropout masks as the forward
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*inputs)
        finally:
            _rng_restore(current)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None,) + tuple(x.grad if isinstance(x, torch.Tensor) else None for x in inputs)


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """Activation checkpointing: ``fn(*args)`` (returning a tensor or tuple of tensors) is recomputed in backward
    with the CPU, device and tracker RNG states of the forward, so dropout masks match and gradients are identical.
    Non-tensor args are passed through unchanged."""
    return _CheckpointFunction.apply(fn, *args)
