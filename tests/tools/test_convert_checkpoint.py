"""tools/convert_checkpoint.py: re-sharding, Hugging Face export / import, bit-exact round trips, memory."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, load_shard
from model.sharding import expected_names
from tests.model.checkpoint_fixtures import full_state, round_to, sample_inputs, tiny_model, write_released_shards
from tools.convert_checkpoint import main

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "model" / "tiny_config.json"


def convert(*args) -> None:
    assert main([*map(str, args), "--no-progress"]) == 0


def _modules(load_dir: Path, iteration: str = "100000") -> list[dict]:
    return [load_shard(p) for p in sorted((load_dir / iteration).glob("mp_rank_*_model_states.pt"))]


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    model = round_to(tiny_model(seed=0), torch.float16)
    root = tmp_path_factory.mktemp("released")
    write_released_shards(full_state(model), root / "mp4", 4)
    return {"model": model, "dir": root / "mp4"}


@pytest.mark.parametrize("middle", [1, 2, 8])
def test_reshard_round_trip_is_bit_exact(released, tmp_path, capsys, middle):
    src = released["dir"]
    if middle == 8:  # 8 does not divide 4 heads: refused with the file and key named, nothing written
        assert main(["--load", str(src), "--save", str(tmp_path / "mid"), "--target-mp", "8", "--no-progress"]) == 1
        assert re.search(r"mp_rank_00_model_states.pt: MP size 8 does not divide .*relative_attention_bias",
                         capsys.readouterr().err)
        assert not list(tmp_path.rglob("*.pt"))
        return
    convert("--load", src, "--save", tmp_path / "mid", "--target-mp", middle)
    convert("--load", tmp_path / "mid", "--save", tmp_path / "back", "--target-mp", 4)
    assert (tmp_path / "mid" / "latest_checkpointed_iteration.txt").read_text().strip() == "100000"
    mid = _modules(tmp_path / "mid")
    assert len(mid) == middle and all(s["mp_world_size"] == middle for s in mid)
    for before, after in zip(_modules(src), _modules(tmp_path / "back")):
        _assert_bit_exact(before["module"], after["module"])  # aliases kept, fp16 kept
        module = after["module"]
        assert module["encoder.word_embeds.weight"].data_ptr() == module["word_embeds.weight"].data_ptr()
        for key in ("lr_scheduler", "skipped_steps", "global_steps", "global_samples", "dp_world_size", "iteration",
                    "csr_tensor_module_names", "random_rng_state"):
            assert before[key] == after[key], key
        assert torch.equal(before["torch_rng_state"], after["torch_rng_state"])
        assert after["mp_world_size"] == 4


def test_reshard_dtype_round_trip(released, tmp_path):
    convert("--load", released["dir"], "--save", tmp_path / "fp32", "--target-mp", 2, "--dtype", "fp32")
    assert all(v.dtype == torch.float32 for s in _modules(tmp_path / "fp32") for v in s["module"].values())
    convert("--load", tmp_path / "fp32", "--save", tmp_path / "fp16", "--target-mp", 4, "--dtype", "fp16")
    for before, after in zip(_modules(released["dir"]), _modules(tmp_path / "fp16")):
        _assert_bit_exact(before["module"], after["module"])


def test_converted_checkpoint_loads_into_the_model(released, tmp_path):
    convert("--load", released["dir"], "--save", tmp_path / "mp2", "--target-mp", 2)
    model = tiny_model(seed=5)
    assert load_checkpoint(model, tmp_path / "mp2").source_mp_size == 2
    with torch.no_grad():
        assert torch.equal(model(**sample_inputs())["lm_logits"], released["model"](**sample_inputs())["lm_logits"])


def test_errors_are_reported_not_raised(released, tmp_path, capsys):
    assert main(["--load", str(tmp_path), "--save", str(tmp_path / "o"), "--target-mp", "2", "--no-progress"]) == 1
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
    convert("--load", released["dir"], "--save", tmp_path / "o", "--target-mp", 2)
    assert main(["--load", str(released["dir"]), "--save", str(tmp_path / "o"), "--target-mp", "1",
                 "--no-progress"]) == 1  # would leave a stale mp_rank_01 beside the new mp_rank_00
    assert "already holds mp_rank_XX_model_states.pt files" in capsys.readouterr().err
    assert main(["--load", str(released["dir"]), "--save", str(tmp_path / "p"), "--eos-token-id", "3",
                 "--no-progress"]) == 2
    assert "--eos-token-id only apply with --to-hf" in capsys.readouterr().err


def test_vocab_file_roles_are_looked_up_by_string(cn_vocab):
    from tools.convert_checkpoint import _vocab_roles

    assert _vocab_roles(cn_vocab) == {"pad_token_id": 5, "decoder_start_token_id": 1, "eos_token_id": 26051}


# ---------------------------------------------------------------- Hugging Face

def _to_hf(tmp_path: Path, dtype: torch.dtype = torch.float32):
    model = round_to(tiny_model(seed=0), dtype) if dtype != torch.float32 else tiny_model(seed=0)
    write_released_shards(full_state(model), tmp_path / "cpm2", 2, dtype=dtype)
    convert("--load", tmp_path / "cpm2", "--save", tmp_path / "hf", "--to-hf", "--model-config", TINY_CONFIG)
    return model


def test_to_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import T5ForConditionalGeneration

    model = _to_hf(tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["feed_forward_proj"] == "gated-gelu" and cfg["tie_word_embeddings"] is False
    assert (cfg["vocab_size"], cfg["pad_token_id"], cfg["decoder_start_token_id"], cfg["eos_token_id"]) == \
        (256, 5, 1, 256 - 190 + 1)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    x = sample_inputs()
    with torch.no_grad():
        ours = model(**x)["lm_logits"]
        theirs = hf(input_ids=x["enc_input_ids"], decoder_input_ids=x["dec_input_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_hf_cpm2_hf_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=96, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=3,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_max_distance=64)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    convert("--load", tmp_path / "hf", "--save", tmp_path / "cpm2", "--from-hf", "--target-mp", 2)
    cpm2_cfg = json.loads((tmp_path / "cpm2" / "release" / "model_config.json").read_text())
    assert (cpm2_cfg["num_decoder_layers"], cpm2_cfg["relative_attention_max_distance"]) == (3, 64)
    assert [s["mp_world_size"] for s in _modules(tmp_path / "cpm2", "release")] == [2, 2]
    convert("--load", tmp_path / "cpm2", "--save", tmp_path / "hf2", "--to-hf",
            "--model-config", tmp_path / "cpm2" / "release" / "model_config.json")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    a = {k: v for k, v in a.items() if not k.endswith("embed_tokens.weight")}  # tied aliases of shared
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # ... and the CPM-2 shards hold the same model as the HF one.
    model = tiny_model(seed=3, vocab_size=96, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=3,
                       relative_attention_max_distance=64)
    load_checkpoint(model, tmp_path / "cpm2")
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    x = sample_inputs(vocab=96)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x["enc_input_ids"], decoder_input_ids=x["dec_input_ids"]).logits,
                                   model(**x)["lm_logits"], rtol=0, atol=1e-4)


def test_t5_v1_0_is_refused(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=1)  # relu, tied
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    assert main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "o"), "--from-hf", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "feed_forward_proj='relu'" in err and "T5 v1.0" in err and not (tmp_path / "o").exists()


def test_to_hf_checks_the_model_config(tmp_path, capsys):
    write_released_shards(full_state(tiny_model()), tmp_path / "cpm2", 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(TINY_CONFIG.read_text()), "num_heads": 8, "d_kv": 8}))
    assert main(["--load", str(tmp_path / "cpm2"), "--save", str(tmp_path / "hf"), "--to-hf", "--model-config",
                 str(bad), "--no-progress"]) == 1
    assert "relative_attention_bias" in capsys.readouterr().err


# ---------------------------------------------------------------- memory

_RSS_WRAPPER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from tools.convert_checkpoint import main, peak_rss_bytes
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    base = rss()
    rc = main(sys.argv[2:])
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would include pytest's own peak (inherited over fork + exec)
    print(f"RSS base={base} peak={peak} growth={peak - base}")
    sys.exit(rc)
""")


def test_reshard_memory_stays_below_twice_the_model(tmp_path):
    # ~206 MB of fp32 weights (d_model 512, 3+3 layers, vocab 32000), written directly as tensors.
    cfg = dict(d_model=512, d_ff=1024, d_kv=64, num_heads=8, vocab=32000)
    hk = cfg["num_heads"] * cfg["d_kv"]
    d, f = cfg["d_model"], cfg["d_ff"]
    suffix_shapes = {"project.weight": (3 * hk, d), "relative_attention_bias.weight": (32, 8), "dense.weight": (d, hk),
                     "project_q.weight": (hk, d), "project_kv.weight": (2 * hk, d), "wi_0.weight": (f, d),
                     "wi_1.weight": (f, d), "wo.weight": (d, f), "layer_norm.weight": (d,),
                     "final_layernorm.weight": (d,), "word_embeds.weight": (cfg["vocab"], d),
                     "lm_head.weight": (cfg["vocab"], d)}
    torch.manual_seed(0)
    full = {n: torch.randn(next(s for k, s in suffix_shapes.items() if n.endswith(k))) for n in expected_names(3)}
    size = sum(t.numel() * 4 for t in full.values())
    assert 190e6 < size < 230e6
    write_released_shards(full, tmp_path / "src", 4, dtype=None, aliases=False)
    del full
    results = {}
    for target in (1, 8):
        out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(ROOT), "--load", str(tmp_path / "src"),
                              "--save", str(tmp_path / f"mp{target}"), "--target-mp", str(target), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RSS"))
        results[target] = int(line.split("growth=")[1])
        print(f"target MP {target}: model {size / 2**20:.0f} MiB, peak RSS growth {results[target] / 2**20:.0f} MiB")
    assert results[1] < 2 * size  # output = the full model, plus one 1/4 input shard at a time
    assert results[8] < 0.75 * size  # output 1/8, input 1/4 (memory-mapped, half of it read)
