"""Helpers shared by the checkpoint and conversion tests: a tiny model, released-style shards.

`write_released_shards` writes what the 2021 CPM-2 release holds (SPEC §4): per rank a dict with `module`
(fp16, plus the two `word_embeds` aliases) and DeepSpeed 0.3.9's top-level keys, pickled the way numpy 1.x
did (ndarrays reduced through `numpy.core.multiarray._reconstruct`, a name numpy 2 no longer uses).
"""
from __future__ import annotations

import pickle
import random
import types
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from model.sharding import split_full

TINY = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=256)

_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct


class _Numpy1Pickler(pickle._Pickler):  # the pure-Python pickler lets us choose how a global is written
    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


# torch.save only needs `pickle_module.Pickler`.
NUMPY1_PICKLE = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="pickle")


def tiny_config(**overrides):
    from model import EncDecConfig

    return EncDecConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides):
    from model import EncDecModel

    torch.manual_seed(seed)
    model = EncDecModel(tiny_config(**overrides), parallel_output=False)
    with torch.no_grad():  # larger weights than the tiny init so the logits differ measurably
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def round_to(model, dtype: torch.dtype):
    """Round the model's weights through `dtype` (what saving it as fp16 does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
    return model


def released_states(module: dict, *, mp_size: int, iteration: int = 100000) -> dict:
    """DeepSpeed 0.3.9 top-level keys around `module`, with RNG states as the original saved them."""
    return {
        "module": module,
        "optimizer": None,
        "lr_scheduler": {"start_lr": 0.0, "warmup_iter": 0, "num_iters": 0, "decay_style": "linear", "end_iter": 1},
        "csr_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 8,
        "mp_world_size": mp_size,
        "iteration": iteration,
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # a ByteTensor like torch.cuda.get_rng_state()
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }


def write_released_shards(full: Mapping[str, torch.Tensor], load_dir: Path, mp_size: int, *,
                          iteration: int | str = 100000, dtype: torch.dtype | None = torch.float16,
                          aliases: bool = True, tracker: bool = True,
                          extra: Mapping[str, torch.Tensor] | None = None) -> list[Path]:
    """Split `full` into `mp_size` released-style shard files under `load_dir/<iteration>/`.

    `extra` tensors are added unsplit to every shard (keys that are not CPM-2 parameters).
    """
    it_dir = Path(load_dir) / str(iteration)
    it_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(mp_size):
        shard = split_full(full, mp_size, r)
        if dtype is not None:
            shard = {k: v.to(dtype) for k, v in shard.items()}
        module = {}
        for k, v in shard.items():
            module[k] = v
            if aliases and k == "word_embeds.weight":  # the original model's state_dict order
                module["encoder.word_embeds.weight"] = v
                module["decoder.word_embeds.weight"] = v
        module.update(extra or {})
        states = released_states(module, mp_size=mp_size, iteration=iteration if isinstance(iteration, int) else 0)
        path = it_dir / f"mp_rank_{r:02d}_model_states.pt"
        torch.save(states, path, pickle_module=NUMPY1_PICKLE, pickle_protocol=2)
        paths.append(path)
    if tracker:
        (Path(load_dir) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return paths


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sample_inputs(vocab: int = 256, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"enc_input_ids": torch.randint(0, vocab, (2, 7), generator=g),
            "dec_input_ids": torch.randint(0, vocab, (2, 5), generator=g)}


def mp_load_worker(rank: int, world: int, load_dirs: list[str], out_path: str, init_file: str) -> None:
    """Spawned process: join a gloo group at MP `world`, load each checkpoint, rank 0 saves the logits."""
    import torch.distributed as dist

    import mpu
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mpu.initialize_model_parallel(world)
        results = {}
        for load_dir in load_dirs:
            model = tiny_model(seed=100 + rank)  # random weights, different per rank: all must be overwritten
            info = load_checkpoint(model, load_dir)
            with torch.no_grad():
                logits = model(**sample_inputs())["lm_logits"]
            results[load_dir] = {"logits": logits, "files": [p.name for p in info.files_read],
                                 "source_mp": info.source_mp_size, "mp": info.mp_size, "rank": info.mp_rank}
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()
