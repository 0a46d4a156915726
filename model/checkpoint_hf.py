"""Hugging Face T5 (v1.1 / mT5) <-> CPM-2 full state dicts and configs.

The architectures are the same (SPEC §2): HF `shared` is `word_embeds`, HF `q`/`k`/`v` are the three row
blocks of our fused `project` (Q, K, V order), `EncDecAttention.k`/`v` the two blocks of `project_kv`, and
HF `relative_attention_bias.weight` is [num_buckets, num_heads] like ours (`nn.Embedding(buckets, heads)`
in transformers' `T5Attention`). The name mapping is the `hf` column of `model.sharding.PARAM_TABLE`.
Only gated-GeLU models with an untied head match CPM-2's maths: T5 v1.0 (ReLU FF, head tied to the
embeddings and logits scaled by d_model^-0.5) is refused rather than converted into a different model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from model.sharding import WORD_EMBED_ALIASES, expected_names, hf_names_for

__all__ = ["full_to_hf", "hf_to_full", "hf_config_for", "cpm2_config_from_hf", "read_hf_state_dict",
           "write_hf_state_dict", "sentinel_roles", "TOKEN_ROLES"]

# HF stores the shared embedding once more per stack; transformers re-ties them on load.
HF_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
GATED_GELU = ("gated-gelu", "gated-gelu_new")  # transformers maps both to the tanh GeLU ("gelu_new")

TOKEN_ROLES = ("pad_token_id", "eos_token_id", "decoder_start_token_id")

# Sentinel count of the released vocabs (SPEC §5): `<s_1>` (the stop token) is sentinel 1.
KNOWN_SENTINELS = {26240: 190, 51968: 185}


def sentinel_roles(vocab_size: int, num_sentinels: int | None = None) -> dict[str, int]:
    """CPM-2 special-token ids: pad `<pad>` 5, decoder start `<s>` 1, eos `<s_1>` = first sentinel + 1."""
    n = num_sentinels if num_sentinels is not None else KNOWN_SENTINELS.get(vocab_size, 190)
    if not 0 < n < vocab_size:
        raise ValueError(f"cannot place {n} sentinels in a vocab of {vocab_size}; pass --eos-token-id")
    return {"pad_token_id": 5, "decoder_start_token_id": 1, "eos_token_id": vocab_size - n + 1}


def full_to_hf(full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPM-2 state dict -> HF T5ForConditionalGeneration state dict (new, unshared tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name in WORD_EMBED_ALIASES:
            continue
        hf = hf_names_for(name)
        if not hf:
            raise ValueError(f"{name} has no Hugging Face T5 counterpart (a prompt-tuned checkpoint? save the "
                             f"prompt separately and convert the base model)")
        # Fused rows split into equal blocks; clone so no two saved tensors share storage (safetensors).
        for hf_name, part in zip(hf, tensor.chunk(len(hf), dim=0)):
            out[hf_name] = part.clone() if len(hf) > 1 else tensor
    return out


def hf_to_full(hf: Mapping[str, torch.Tensor], *, num_layers: int, num_decoder_layers: int,
               source: str = "HF checkpoint") -> dict[str, torch.Tensor]:
    """HF T5 state dict -> full CPM-2 state dict. Every HF tensor must be used (aliases excepted)."""
    used: set[str] = set()
    full: dict[str, torch.Tensor] = {}
    for name in expected_names(num_layers, num_decoder_layers):
        parts = []
        for hf_name in hf_names_for(name):
            if hf_name not in hf:
                extra = (" (a T5 v1.0 / tied checkpoint has no separate lm_head; only untied T5 v1.1 / mT5 "
                         "models can be converted)" if hf_name == "lm_head.weight" else "")
                raise ValueError(f"{source}: missing key {hf_name!r} (needed for {name}){extra}")
            parts.append(hf[hf_name])
            used.add(hf_name)
        full[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    for alias in HF_EMBED_ALIASES:
        if alias in hf:
            used.add(alias)
            if not torch.equal(hf[alias], full["word_embeds.weight"]):
                raise ValueError(f"{source}: {alias} differs from shared.weight; CPM-2 shares one embedding")
    unknown = sorted(set(hf) - used)
    if unknown:
        raise ValueError(f"{source}: unexpected key {unknown[0]!r} ({len(unknown)} in all): not part of a "
                         f"T5 v1.1 model with {num_layers}+{num_decoder_layers} layers")
    return full


def hf_config_for(cpm2: Mapping[str, Any], *, vocab_size: int, dtype: torch.dtype, pad_token_id: int,
                  eos_token_id: int, decoder_start_token_id: int) -> dict[str, Any]:
    """`config.json` of a T5ForConditionalGeneration with CPM-2's architecture."""
    num_layers = int(cpm2["num_layers"])
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": vocab_size,
        "d_model": int(cpm2["d_model"]),
        "d_ff": int(cpm2["d_ff"]),
        "d_kv": int(cpm2["d_kv"]),
        "num_heads": int(cpm2["num_heads"]),
        "num_layers": num_layers,
        "num_decoder_layers": int(cpm2.get("num_decoder_layers") or num_layers),
        "relative_attention_num_buckets": int(cpm2.get("relative_attention_num_buckets", 32)),
        "relative_attention_max_distance": int(cpm2.get("relative_attention_max_distance", 128)),
        "dropout_rate": float(cpm2.get("dropout_rate", 0.0)),
        "layer_norm_epsilon": float(cpm2.get("layer_norm_epsilon", 1e-6)),
        "initializer_factor": float(cpm2.get("initializer_factor", 1.0)),
        # CPM-2's JSON says "relu" but the model is gated GeLU (tanh); transformers calls that "gated-gelu".
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,  # separate lm_head, logits not scaled
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "decoder_start_token_id": decoder_start_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def cpm2_config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> dict[str, Any]:
    """CPM-2 model config (the original JSON keys) from an HF T5 config; refuses non-v1.1 models."""
    ff = hf.get("feed_forward_proj", "relu")
    tied = hf.get("tie_word_embeddings", True)  # T5Config's default is tied (T5 v1.0)
    if ff not in GATED_GELU or tied:
        raise ValueError(f"{source}: feed_forward_proj={ff!r}, tie_word_embeddings={tied}: only T5 v1.1 / "
                         f"mT5-style models (feed_forward_proj 'gated-gelu', tie_word_embeddings false) have "
                         f"CPM-2's architecture; T5 v1.0 (ReLU, tied head with scaled logits) cannot be converted")
    if hf.get("model_type", "t5") not in ("t5", "mt5"):
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not t5 / mt5")
    num_layers = int(hf["num_layers"])
    roles = {k: hf[k] for k in TOKEN_ROLES if isinstance(hf.get(k), int)}
    if "decoder_start_token_id" not in roles and "pad_token_id" in roles:
        roles["decoder_start_token_id"] = roles["pad_token_id"]  # T5 starts decoding with pad when unset
    return {
        "d_model": int(hf["d_model"]), "d_ff": int(hf["d_ff"]), "d_kv": int(hf["d_kv"]),
        "num_heads": int(hf["num_heads"]), "num_layers": num_layers,
        "num_decoder_layers": int(hf.get("num_decoder_layers") or num_layers),
        "dropout_rate": float(hf.get("dropout_rate", 0.1)),
        "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-6)),
        "relative_attention_num_buckets": int(hf.get("relative_attention_num_buckets", 32)),
        "relative_attention_max_distance": int(hf.get("relative_attention_max_distance", 128)),
        "init_method_std": 0.001, "use_scaled_init_for_output_weights": True,
        "feed_forward_proj": "gated-gelu", "vocab_size": int(hf["vocab_size"]),
        # Not model config, but kept so that --to-hf restores them (EncDecConfig ignores unknown keys).
        **roles,
    }


def read_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an HF model directory: (sharded) `model.safetensors` or (sharded) `pytorch_model.bin`."""
    hf_dir = Path(hf_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        files = ([hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
                 if index.is_file() else [hf_dir / single] if (hf_dir / single).is_file() else [])
        if files:
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(_read_hf_file(f))
            return out
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (or their .index.json) found")


def _read_hf_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from model.checkpoint_io import load_shard  # weights_only: HF .bin files hold only tensors

    return load_shard(path)


def write_hf_state_dict(tensors: Mapping[str, torch.Tensor], hf_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` (pytorch_model.bin when safetensors is not installed), atomically."""
    from model.checkpoint_io import atomic_torch_save

    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    try:
        from safetensors.torch import save_file
    except ImportError:
        return atomic_torch_save(dict(tensors), hf_dir / "pytorch_model.bin")
    path = hf_dir / "model.safetensors"
    tmp = hf_dir / ".model.safetensors.tmp"  # same directory, so the rename is atomic
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
