"""model/checkpoint.py, model/checkpoint_io.py, model/sharding.py: split rules, safe reading, loading at any
MP size, atomic saving."""
from __future__ import annotations

import os
import pickletools
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from model.checkpoint import (LoadInfo, atomic_torch_save, load_checkpoint, load_shard, read_tracker,
                              save_model_checkpoint, write_tracker)
from model.checkpoint_io import SHARD_SAFE_GLOBALS
from model.sharding import PARAM_TABLE, expected_names, merge_shards, split_full
from tests.model.checkpoint_fixtures import (full_state, mp_load_worker, round_to, sample_inputs, tiny_model,
                                             write_released_shards)

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "encoder.blocks.0.self_attn.self_attn.project.weight"
PROJECT_KV = "decoder.blocks.1.cross_attn.cross_attn.project_kv.weight"
REL_BIAS = "decoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight"


def _synthetic_full(heads: int = 12, d_kv: int = 2, d: int = 6, d_ff: int = 24, vocab: int = 48,
                    layers: int = 2) -> dict[str, torch.Tensor]:
    """A full state dict of distinct values (no model), sized so that MP 2, 3, 4, 6 all divide it."""
    hk = heads * d_kv
    shapes = {"project.weight": (3 * hk, d), "relative_attention_bias.weight": (32, heads), "dense.weight": (d, hk),
              "project_q.weight": (hk, d), "project_kv.weight": (2 * hk, d), "wi_0.weight": (d_ff, d),
              "wi_1.weight": (d_ff, d), "wo.weight": (d, d_ff), "layer_norm.weight": (d,),
              "final_layernorm.weight": (d,), "word_embeds.weight": (vocab, d), "lm_head.weight": (vocab, d)}
    full, start = {}, 0
    for name in expected_names(layers):
        shape = next(s for suffix, s in shapes.items() if name.endswith(suffix))
        n = torch.Size(shape).numel()
        full[name] = torch.arange(start, start + n, dtype=torch.float32).reshape(shape)
        start += n
    return full


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model (weights rounded through fp16) saved as released-style fp16 shards at MP 4, 2 and 1."""
    model = round_to(tiny_model(seed=0), torch.float16)
    with torch.no_grad():
        logits = model(**sample_inputs())["lm_logits"]
    root = tmp_path_factory.mktemp("released")
    dirs = {}
    for q in (4, 2, 1):
        dirs[q] = root / f"mp{q}"
        write_released_shards(full_state(model), dirs[q], q)
    return {"model": model, "logits": logits, "dirs": dirs}


# ---------------------------------------------------------------- split rules (pure state-dict operations)

def test_table_covers_every_model_parameter():
    model = tiny_model()
    assert list(sorted(model.state_dict())) == sorted(expected_names(2))
    assert len({spec.name for spec in PARAM_TABLE}) == len(PARAM_TABLE)


def test_split_follows_the_stride_rules():
    full = _synthetic_full()
    hk = 24
    q, k, v = full[PROJECT].split(hk)
    for p in (2, 3, 4):
        for r in range(p):
            shard = split_full(full, p, r)
            rows = slice(r * hk // p, (r + 1) * hk // p)
            assert torch.equal(shard[PROJECT], torch.cat([q[rows], k[rows], v[rows]]))  # [Q_r; K_r; V_r]
            kk, vv = full[PROJECT_KV].split(hk)
            assert torch.equal(shard[PROJECT_KV], torch.cat([kk[rows], vv[rows]]))  # [K_r; V_r]
            heads = slice(r * 12 // p, (r + 1) * 12 // p)
            assert torch.equal(shard[REL_BIAS], full[REL_BIAS][:, heads])  # heads are columns
            v_rows = slice(r * 48 // p, (r + 1) * 48 // p)
            assert torch.equal(shard["lm_head.weight"], full["lm_head.weight"][v_rows])
            wo = "encoder.blocks.0.ff.dense_relu_dense.wo.weight"
            assert torch.equal(shard[wo], full[wo][:, r * 24 // p:(r + 1) * 24 // p])
            assert torch.equal(shard["encoder.final_layernorm.weight"], full["encoder.final_layernorm.weight"])


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
def test_merge_inverts_split(p):
    full = _synthetic_full()
    merged = merge_shards([split_full(full, p, r) for r in range(p)])
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_aliases_are_checked_and_dropped():
    full = _synthetic_full()
    shards = [split_full(full, 2, r) for r in range(2)]
    for s in shards:
        s["encoder.word_embeds.weight"] = s["word_embeds.weight"]
        s["decoder.word_embeds.weight"] = s["word_embeds.weight"].clone()
    merged = merge_shards(shards)
    assert "encoder.word_embeds.weight" not in merged and "decoder.word_embeds.weight" not in merged
    shards[1]["decoder.word_embeds.weight"] = shards[1]["word_embeds.weight"] + 1
    with pytest.raises(ValueError, match=r"rank 1.*decoder.word_embeds.weight.*differs"):
        merge_shards(shards)


def test_split_refuses_an_mp_size_that_does_not_divide():
    with pytest.raises(ValueError, match=r"MP size 5 does not divide word_embeds.weight \(size 48 along dim 0"):
        split_full(_synthetic_full(), 5, 0)
    with pytest.raises(ValueError, match=r"MP size 8 does not divide .*relative_attention_bias.weight"):
        split_full(_synthetic_full(), 8, 0)  # 12 heads
    with pytest.raises(ValueError, match=r"unknown parameter 'encoder.extra.weight'"):
        split_full({**_synthetic_full(), "encoder.extra.weight": torch.zeros(2)}, 2, 0)


# ---------------------------------------------------------------- safe reading

def test_released_file_with_numpy1_pickle_names_loads(source):
    path = source["dirs"][4] / "100000" / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert "numpy.core.multiarray _reconstruct" in globals_  # the numpy 1.x name, as in the 2021 files
    assert not any(g.startswith("numpy._core") for g in globals_)
    states = load_shard(path)
    assert states["csr_tensor_module_names"] == set() and states["mp_world_size"] == 4
    assert states["np_rng_state"][0] == "MT19937" and states["np_rng_state"][1].dtype.name == "uint32"
    assert states["module"]["word_embeds.weight"].dtype == torch.float16
    # The old name is what needs the allow-list entry: without it, weights_only refuses the file.
    new_only = [g for g in SHARD_SAFE_GLOBALS if not (isinstance(g, tuple) and g[1].startswith("numpy.core."))]
    with torch.serialization.safe_globals(new_only), pytest.raises(Exception, match="numpy.core.multiarray"):
        torch.load(path, map_location="cpu", weights_only=True)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"word_embeds.weight": torch.zeros(2, 2)}, "x": _Payload(marker)}, path)
    with pytest.raises(RuntimeError, match=rf"{path}: refused to load.*(posix|os)\.system"):
        load_shard(path)
    assert not marker.exists()


def test_truncated_and_garbage_files_name_the_file(tmp_path, source):
    good = (source["dirs"][4] / "100000" / "mp_rank_00_model_states.pt").read_bytes()
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match=rf"{path}: cannot read checkpoint file, it is truncated or corrupt"):
        load_shard(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match=rf"{path}: cannot read"):
        load_shard(path)


# ---------------------------------------------------------------- loading at any MP size

@pytest.mark.parametrize("q", [4, 2, 1])
def test_load_released_shards_at_mp1(source, q):
    model = tiny_model(seed=7)
    info = load_checkpoint(model, source["dirs"][q])
    assert isinstance(info, LoadInfo)
    assert (info.iteration, info.source_mp_size, info.mp_size, info.dtype) == (100000, q, 1, torch.float16)
    assert len(info.keys_loaded) == 42 and info.keys_missing == [] and len(info.files_read) == q
    assert info.client_state["iteration"] == 100000 and "module" not in info.client_state
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        logits = model(**sample_inputs())["lm_logits"]
    assert torch.equal(logits, source["logits"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp16_shards_cast_to_the_model_dtype(source, dtype):
    model = tiny_model(seed=7).to(dtype)
    load_checkpoint(model, source["dirs"][4])
    ref = source["model"].state_dict()
    assert all(v.dtype == dtype and torch.equal(v, ref[k].to(dtype)) for k, v in model.state_dict().items())


@pytest.mark.parametrize("world", [2, 4])
def test_load_at_mp2_and_mp4_with_gloo(source, tmp_path, world):
    dirs = [str(source["dirs"][q]) for q in (4, 2, 1)]
    out = tmp_path / "out.pt"
    torch.multiprocessing.spawn(mp_load_worker, args=(world, dirs, str(out), str(tmp_path / "rdzv")),
                                nprocs=world, join=True)
    per_rank = torch.load(out, weights_only=True)
    for load_dir, q in zip(dirs, (4, 2, 1)):
        for rank, results in enumerate(per_rank):
            res = results[load_dir]
            assert (res["source_mp"], res["mp"], res["rank"]) == (q, world, rank)
            torch.testing.assert_close(res["logits"], source["logits"], rtol=1e-5, atol=1e-5)
            if q == world:  # same MP size: each rank reads only its own file
                assert res["files"] == [f"mp_rank_{rank:02d}_model_states.pt"]
            else:
                assert len(res["files"]) == max(1, q // world)


# ---------------------------------------------------------------- failure modes

def test_missing_tracker_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/latest_checkpointed_iteration.txt.*"
                                                r"mp_rank_XX_model_states.pt.*Refusing to start from random"):
        load_checkpoint(tiny_model(), tmp_path)


def test_bad_tracker_and_missing_iteration_dir(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("latest\n")
    with pytest.raises(ValueError, match="expected an iteration number or 'release', found 'latest'"):
        read_tracker(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    with pytest.raises(FileNotFoundError, match=rf"names iteration 'release' but the directory {tmp_path}/release"):
        load_checkpoint(tiny_model(), tmp_path)


def test_missing_shard_is_reported(tmp_path, source):
    full = full_state(source["model"])
    paths = write_released_shards(full, tmp_path / "gap", 4)
    paths[2].unlink()
    with pytest.raises(FileNotFoundError, match=r"found 3 of 4 shard files .*mp_rank_02_model_states.pt"):
        load_checkpoint(tiny_model(), tmp_path / "gap")
    paths = write_released_shards(full, tmp_path / "last", 4)
    paths[3].unlink()  # no gap in the names: the files' mp_world_size gives it away
    with pytest.raises(FileNotFoundError, match=r"found 3 of 4 shard files"):
        load_checkpoint(tiny_model(), tmp_path / "last")


def test_unknown_and_missing_keys(tmp_path, source):
    full = full_state(source["model"])
    write_released_shards(full, tmp_path / "extra", 2, extra={"encoder.blocks.0.ff.layer_norm.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: unexpected key 'encoder.blocks.0.ff."):
        load_checkpoint(tiny_model(), tmp_path / "extra")
    assert load_checkpoint(tiny_model(), tmp_path / "extra", strict=False).keys_unexpected == [
        "encoder.blocks.0.ff.layer_norm.bias"]
    partial = {k: v for k, v in full.items() if k != "lm_head.weight"}
    write_released_shards(partial, tmp_path / "partial", 2)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: missing key 'lm_head.weight'"):
        load_checkpoint(tiny_model(), tmp_path / "partial")
    info = load_checkpoint(tiny_model(), tmp_path / "partial", strict=False)
    assert info.keys_missing == ["lm_head.weight"]


def test_unexpected_key_known_to_the_table(tmp_path, source):
    model = tiny_model()
    full = {**full_state(source["model"]), "encoder.prompt_embeds.weight": torch.zeros(5, 64)}
    write_released_shards(full, tmp_path, 2)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: unexpected key 'encoder.prompt_embeds"):
        load_checkpoint(model, tmp_path)
    assert load_checkpoint(model, tmp_path, strict=False).keys_unexpected == ["encoder.prompt_embeds.weight"]


def test_prompt_model_loads_base_checkpoint_only_when_allowed(source):
    from model import EncDecModel
    from tests.model.checkpoint_fixtures import tiny_config

    model = EncDecModel(tiny_config(), parallel_output=False, prompt_config={"enc": {"prompt_len": 3}})
    prompt_before = model.state_dict()["encoder.prompt_embeds.weight"].clone()
    with pytest.raises(ValueError, match=r"missing key 'encoder.prompt_embeds.weight'.*allow_missing"):
        load_checkpoint(model, source["dirs"][4])
    info = load_checkpoint(model, source["dirs"][4], allow_missing=("encoder.prompt_embeds.weight",))
    assert info.keys_missing == ["encoder.prompt_embeds.weight"]
    assert torch.equal(model.state_dict()["encoder.prompt_embeds.weight"], prompt_before)


def test_shape_mismatch_names_file_and_key(source):
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt: shape mismatch for word_embeds.weight"):
        load_checkpoint(tiny_model(vocab_size=128), source["dirs"][4])
    with pytest.raises(ValueError, match=r"shape mismatch for .*wi_0.weight.*another model size"):
        load_checkpoint(tiny_model(d_ff=256), source["dirs"][2])


# ---------------------------------------------------------------- saving

def test_save_then_load_roundtrip(tmp_path):
    model = tiny_model(seed=3)
    path = save_model_checkpoint(model, tmp_path, 20, mp_rank=0, mp_size=1,
                                 client_state={"iteration": 20, "sampler": {"epoch": 2, "position": 17}})
    write_tracker(tmp_path, 20)
    assert path == tmp_path / "20" / "mp_rank_00_model_states.pt"
    states = load_shard(path)
    for key in ("optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                "global_samples", "dp_world_size", "mp_world_size", "iteration"):
        assert key in states
    assert states["sampler"] == {"epoch": 2, "position": 17} and states["mp_world_size"] == 1
    other = tiny_model(seed=4)
    assert load_checkpoint(other, tmp_path).iteration == 20
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def _two_checkpoints(tmp_path: Path):
    old = tiny_model(seed=1)
    save_model_checkpoint(old, tmp_path, 10, mp_rank=0, mp_size=1)
    write_tracker(tmp_path, 10)
    return old, tiny_model(seed=2)


def _assert_previous_checkpoint_intact(tmp_path: Path, old) -> None:
    assert read_tracker(tmp_path) == 10
    loaded = tiny_model(seed=9)
    load_checkpoint(loaded, tmp_path)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert not list(tmp_path.rglob("*.tmp"))  # the failed writer cleaned up after itself


@pytest.mark.parametrize("fail_in", ["torch.save", "os.replace"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    old, new = _two_checkpoints(tmp_path)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written file
        raise OSError("disk full")

    def failing_replace(*args):
        raise OSError("interrupted")

    if fail_in == "torch.save":
        monkeypatch.setattr(torch, "save", half_save)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    for iteration in (10, 20):  # overwrite the current checkpoint, and write a new one
        with pytest.raises(OSError):
            save_model_checkpoint(new, tmp_path, iteration, mp_rank=0, mp_size=1)
    monkeypatch.undo()
    _assert_previous_checkpoint_intact(tmp_path, old)


def test_sigkilled_writer_leaves_previous_checkpoint(tmp_path):
    old, _ = _two_checkpoints(tmp_path)
    # The child writes iteration 10 again and iteration 20, and is killed while each temp file is half done.
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from model.checkpoint import save_model_checkpoint
        from tests.model.checkpoint_fixtures import tiny_model
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.truncate(1000)
            f.flush()
            print("WRITING", flush=True)
            time.sleep(60)
        torch.save = slow_save
        save_model_checkpoint(tiny_model(seed=2), {str(tmp_path)!r}, int(sys.argv[1]), mp_rank=0, mp_size=1)
    """)
    for iteration in (10, 20):
        child = subprocess.Popen([sys.executable, "-c", script, str(iteration)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "WRITING"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    leftovers = list(tmp_path.rglob("*.tmp"))
    assert len(leftovers) == 2  # the killed writers' temp files are still there ...
    assert read_tracker(tmp_path) == 10
    loaded = tiny_model(seed=9)
    load_checkpoint(loaded, tmp_path)  # ... and are not taken for shards
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no mp_rank_XX_model_states.pt files in .*20"):
        load_checkpoint(loaded, tmp_path, iteration=20)


def test_atomic_torch_save_replaces_whole_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(load_shard(path)["a"], torch.zeros(3)) and os.listdir(tmp_path) == ["x.pt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
