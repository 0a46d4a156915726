"""Bad checkpoints through `finetune_cpm2.py --load`: refused with exit code 2 and a message naming the file,
before any training, and a code-running pickle never runs.

The loader's own cases (truncated, garbage, missing shard, unknown keys, shape mismatch, payload, MP re-split)
are unit-tested in tests/model/test_checkpoint.py; this adds the end-to-end path. Two cases run in the default
suite, the others under `slow`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model import EncDecConfig, EncDecModel
from model.checkpoint import save_model_checkpoint, write_tracker
from model.sharding import split_full
from tests.training.helpers import TINY_CONFIG, base_args, make_task_dir, run_finetune
from tokenization_enc_dec import load_tokenizer


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"), train=8, dev=4, test=4)


def _model(vocab: Path, **overrides) -> EncDecModel:
    config = EncDecConfig.from_json_file(str(TINY_CONFIG))
    config.vocab_size = load_tokenizer(str(vocab)).vocab_size
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return EncDecModel(config, parallel_output=True)


def _run_load(task, tmp_path, load_dir: Path):
    data, vocab = task
    save = tmp_path / "run"
    proc = run_finetune(base_args(data, vocab, save, "--load", str(load_dir), "--do-train", "--train-iters", "1"),
                        check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training:" not in proc.stdout and not (save / "checkpoints").exists()  # no training happened
    return proc


def test_code_running_pickle_is_refused_and_never_runs(task, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    shard = ckpt / "1" / "mp_rank_00_model_states.pt"
    shard.parent.mkdir(parents=True)
    state = {k: v for k, v in _model(task[1]).state_dict().items()}
    torch.save({"module": state, "mp_world_size": 1, "extra": Payload(marker)}, shard)
    write_tracker(ckpt, 1)
    proc = _run_load(task, tmp_path, ckpt)
    assert f"error: {shard}: refused to load" in proc.stderr and "system" in proc.stderr
    assert not marker.exists()


def test_checkpoint_of_another_model_size_is_refused(task, tmp_path):
    ckpt = tmp_path / "ckpt"
    shard = save_model_checkpoint(_model(task[1], d_ff=256), ckpt, 1, mp_rank=0, mp_size=1)
    write_tracker(ckpt, 1)
    proc = _run_load(task, tmp_path, ckpt)
    assert f"error: {shard}: shape mismatch for " in proc.stderr and "wi" in proc.stderr
    assert "another model size" in proc.stderr


def _mp2(task, ckpt: Path) -> list[Path]:
    full = _model(task[1]).state_dict()
    return [save_model_checkpoint(split_full(full, 2, r), ckpt, 1, mp_rank=r, mp_size=2) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated file", "missing shard", "wrong MP count"])
def test_other_bad_checkpoints_are_refused(task, tmp_path, case):
    ckpt = tmp_path / "ckpt"
    shards = _mp2(task, ckpt)
    write_tracker(ckpt, 1)
    if case == "truncated file":
        data = shards[1].read_bytes()
        shards[1].write_bytes(data[: len(data) // 2])
        expected = f"error: {shards[1]}: cannot read checkpoint file, it is truncated or corrupt"
    elif case == "missing shard":
        shards[1].unlink()
        expected = f"found 1 of 2 shard files in {shards[0].parent}"
    else:  # a third shard file from another save: the files say MP 2, the directory holds 3
        extra = shards[1].with_name("mp_rank_02_model_states.pt")
        extra.write_bytes(shards[1].read_bytes())
        expected = "says mp_world_size 2 but"
    proc = _run_load(task, tmp_path, ckpt)
    assert expected in proc.stderr, proc.stderr[-2000:]
