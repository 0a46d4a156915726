"""Load CPM-2 checkpoints into a model at any model-parallel size, and save them in the released layout.

`load_checkpoint` fills a model running at MP size p from shards saved at MP size q (p, q any sizes that
divide the split dims): when p == q each rank reads only its own file; otherwise each rank reads, one at a
time, only the source shards that overlap its part and copies the overlapping slices straight into its
parameters (the stride rules of `model.sharding`), so no rank ever holds the full model.

Load the weights *before* the optimizer (and its fp32 master copy under ZeRO / fp16) is built: the
original toolkit loaded afterwards, and ZeRO-1 then overwrote the loaded weights with the random master
copy (reference/original-toolkit.md §10). Nothing here ever falls back to random weights: a missing or
incomplete checkpoint is an error that names the file.

File format, tracker, trust model and atomic writes: `model.checkpoint_io`. Split rules: `model.sharding`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from model.checkpoint_io import (SHARD_SAFE_GLOBALS, TRACKER_NAME, atomic_torch_save, atomic_write_text,
                                 find_shards, iteration_dir, load_shard, read_model_states, read_tracker,
                                 shard_name, write_tracker)
from model.sharding import (WORD_EMBED_ALIASES, copy_overlap, drop_aliases, full_shape, merge_shards, overlapping_ranks,
                            shard_shape, split_full, split_rule_for)

__all__ = [
    "LoadInfo", "load_checkpoint", "save_model_checkpoint", "model_states", "check_shard_shape",
    # re-exported so callers need one import
    "load_shard", "read_model_states", "read_tracker", "write_tracker", "atomic_torch_save",
    "atomic_write_text", "find_shards", "merge_shards", "split_full", "shard_name", "TRACKER_NAME",
    "SHARD_SAFE_GLOBALS",
]

logger = logging.getLogger(__name__)


@dataclass
class LoadInfo:
    """What `load_checkpoint` did."""

    iteration: int | str  # from the tracker file (an int or "release")
    source_mp_size: int  # number of shard files the checkpoint was saved with
    mp_size: int  # model-parallel size of the model that was filled
    mp_rank: int
    dtype: torch.dtype | None  # dtype of the stored weights (before casting to the model's)
    keys_loaded: list[str] = field(default_factory=list)
    keys_missing: list[str] = field(default_factory=list)  # absent from the files and allowed to be
    keys_unexpected: list[str] = field(default_factory=list)  # in the files, not in the model (strict=False)
    files_read: list[Path] = field(default_factory=list)
    # Top-level entries of the first file read, except `module` (iteration, RNG states, lr_scheduler, ...).
    client_state: dict[str, Any] = field(default_factory=dict)


def _parallel_state(mp_rank: int | None, mp_size: int | None) -> tuple[int, int]:
    if mp_rank is not None and mp_size is not None:
        return mp_rank, mp_size
    if mp_rank is not None or mp_size is not None:
        raise ValueError("pass both mp_rank and mp_size, or neither (then they come from mpu)")
    import mpu  # only needed here; conversion and saving work without the model code

    if mpu.model_parallel_is_initialized():
        return mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()
    return 0, 1


def check_shard_shape(name: str, src_shape: Iterable[int], src_size: int, dst_shape: Iterable[int],
                      dst_size: int, *, source: str) -> tuple[int, ...]:
    """Check that a shard of `src_size` and one of `dst_size` are parts of the same full tensor.

    Returns the full shape; raises ValueError naming `source` and `name` on a size mismatch (a checkpoint
    of another model size) or when an MP size does not divide the split dim.
    """
    src_full = full_shape(name, src_shape, src_size)
    dst_full = full_shape(name, dst_shape, dst_size)
    if src_full != dst_full:
        raise ValueError(f"{source}: shape mismatch for {name}: the file holds {tuple(src_shape)} as 1 of "
                         f"{src_size} shards (full {src_full}) but the model at MP {dst_size} expects "
                         f"{tuple(dst_shape)} per shard (full {dst_full}); is it a checkpoint of another "
                         f"model size or vocab (check --model-config and the tokenizer)?")
    shard_shape(name, dst_full, src_size, what=source)
    shard_shape(name, dst_full, dst_size, what=f"{source} (target)")
    return dst_full


def _check_mp_world_size(states: Mapping[str, Any], path: Path, q: int) -> None:
    stored = states.get("mp_world_size")
    if not isinstance(stored, int) or stored == q:
        return
    if stored > q:
        raise FileNotFoundError(f"found {q} of {stored} shard files in {path.parent} ({path.name} says "
                                f"mp_world_size {stored}); the checkpoint is incomplete")
    raise ValueError(f"{path}: says mp_world_size {stored} but {path.parent} holds {q} shard files; "
                     f"are there leftovers of another save in that directory?")


def _copy_shard(module: Mapping[str, torch.Tensor], src: int, q: int, target: Mapping[str, torch.Tensor],
                rank: int, size: int, *, path: Path, strict: bool, filled: set[str], unexpected: list[str]) -> None:
    """Copy what shard `src` of `q` holds of this rank's part (`rank` of `size`) into `target` in place."""
    for name, tensor in module.items():
        if name not in target:
            if strict:
                raise ValueError(f"{path}: unexpected key {name!r}: the model has no such parameter "
                                 f"(a checkpoint of another architecture? pass strict=False to skip it)")
            if name not in unexpected:
                unexpected.append(name)
            continue
        rule = split_rule_for(name, source=str(path))
        check_shard_shape(name, tensor.shape, q, target[name].shape, size, source=str(path))
        if rule.dim is None and name in filled:
            continue  # replicated: taken from the first file
        copy_overlap(name, tensor, src, q, target[name], rank, size)
        filled.add(name)


def load_checkpoint(model: torch.nn.Module, load_dir: str | os.PathLike, *, mp_rank: int | None = None,
                    mp_size: int | None = None, strict: bool = True, allow_missing: Iterable[str] = (),
                    iteration: int | str | None = None) -> LoadInfo:
    """Fill `model` (this rank's part at MP `mp_size`) from the checkpoint in `load_dir`.

    `iteration` None reads `load_dir/latest_checkpointed_iteration.txt`. `mp_rank`/`mp_size` default to
    mpu's (MP 1 when mpu is not initialised). Stored fp16 weights are cast to each parameter's dtype.
    `allow_missing` lists names the files may lack (e.g. `("encoder.prompt_embeds.weight",)` to put a base
    checkpoint under a prompt-tuned model); such parameters keep their current values. `strict=False`
    also tolerates unexpected keys in the files and any missing key (logged). Raises FileNotFoundError /
    ValueError / RuntimeError naming the file and key; never returns a partly random model silently.
    """
    rank, size = _parallel_state(mp_rank, mp_size)
    if not 0 <= rank < size:
        raise ValueError(f"mp_rank {rank} is out of range for mp_size {size}")
    load_dir = Path(load_dir)
    if iteration is None:
        iteration = read_tracker(load_dir)
    shard_dir = iteration_dir(load_dir, iteration)
    paths = find_shards(shard_dir)
    q = len(paths)

    # The state_dict tensors share storage with the parameters: copying into them fills the model.
    target = drop_aliases(model.state_dict(), source="model.state_dict()")
    info = LoadInfo(iteration=iteration, source_mp_size=q, mp_size=size, mp_rank=rank, dtype=None)
    filled: set[str] = set()
    first_keys: set[str] | None = None
    with torch.no_grad():
        for src in overlapping_ranks(rank, size, q):  # one file at a time: peak = model + one shard
            path = paths[src]
            states = read_model_states(path, mmap=True)
            _check_mp_world_size(states, path, q)
            module = drop_aliases(states.pop("module"), source=str(path))
            if first_keys is None:
                first_keys = set(module)
                info.client_state = states
                info.dtype = next((t.dtype for t in module.values() if t.is_floating_point()), None)
            elif set(module) != first_keys:
                key = sorted(set(module) ^ first_keys)[0]
                raise ValueError(f"{path}: key {key!r} is in only one of {path.name} and "
                                 f"{paths[overlapping_ranks(rank, size, q)[0]].name}; the shards disagree")
            _copy_shard(module, src, q, target, rank, size, path=path, strict=strict, filled=filled,
                        unexpected=info.keys_unexpected)
            info.files_read.append(path)
            del states, module  # release this shard (and its mmap) before reading the next

    info.keys_loaded = [k for k in target if k in filled]
    missing = [k for k in target if k not in filled]
    allowed = set(allow_missing)
    not_allowed = [k for k in missing if k not in allowed]
    if not_allowed and strict:
        hint = (" (a base checkpoint under a prompt-tuned model: pass "
                "allow_missing=('encoder.prompt_embeds.weight',))" if "encoder.prompt_embeds.weight" in not_allowed
                else "")
        raise ValueError(f"{info.files_read[0] if info.files_read else shard_dir}: missing key "
                         f"{not_allowed[0]!r}{f' and {len(not_allowed) - 1} more' if len(not_allowed) > 1 else ''}"
                         f": the model has it but the checkpoint does not{hint}")
    info.keys_missing = missing
    if missing or info.keys_unexpected:
        logger.warning("checkpoint %s: kept current values for %s; skipped unexpected %s",
                       shard_dir, missing, info.keys_unexpected)
    logger.info("loaded %d tensors from %s (saved at MP %d, %s) into MP rank %d of %d", len(info.keys_loaded),
                shard_dir, q, info.dtype, rank, size)
    return info


def model_states(module: Mapping[str, torch.Tensor], *, iteration: int | str, mp_size: int,
                 dp_world_size: int = 1, client_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A model-states dict with DeepSpeed 0.3.9's top-level keys (its loader indexes several of them)."""
    step = iteration if isinstance(iteration, int) else 0
    states: dict[str, Any] = {
        "module": dict(module),
        "optimizer": None,  # optimizer / ZeRO state is saved separately by the engine
        "lr_scheduler": None,
        "csr_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": 0,
        "dp_world_size": dp_world_size,
        "mp_world_size": mp_size,
        "iteration": step,
    }
    states.update(client_state or {})
    return states


def save_model_checkpoint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
                          save_dir: str | os.PathLike, iteration: int | str, *, mp_rank: int, mp_size: int,
                          client_state: Mapping[str, Any] | None = None, dp_world_size: int = 1) -> Path:
    """Write `save_dir/<iteration>/mp_rank_XX_model_states.pt` for this rank, atomically; returns its path.

    `client_state` entries become top-level keys (iteration, RNG states, lr_scheduler, data position, ...)
    and override the defaults. Only plain types load back through the allow-list (tensors, containers,
    numbers, strings, sets, numpy RNG state). Does not touch the tracker: after every rank has saved (a
    barrier), one rank calls `write_tracker(save_dir, iteration)`.
    """
    if not 0 <= mp_rank < mp_size:
        raise ValueError(f"mp_rank {mp_rank} is out of range for mp_size {mp_size}")
    if isinstance(model_or_state_dict, torch.nn.Module):
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    module = {k: v.detach().cpu() for k, v in state_dict.items() if k not in WORD_EMBED_ALIASES}
    states = model_states(module, iteration=iteration, mp_size=mp_size, dp_world_size=dp_world_size,
                          client_state=client_state)
    path = Path(save_dir) / str(iteration) / shard_name(mp_rank)
    return atomic_torch_save(states, path)
