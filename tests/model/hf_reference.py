"""Independent reference for the equivalence tests: our parameter names -> Hugging Face T5 names.

Written from SPEC §2's mapping table, not from model/checkpoint.py, so that a naming or splitting mistake in the
project's own converter cannot hide a modelling mistake here.
"""
from __future__ import annotations

import torch

from model import EncDecConfig


def make_hf_model(cfg: EncDecConfig, *, pad_token_id: int = 0, eos_token_id: int = 1,
                  decoder_start_token_id: int = 0):
    """A ``transformers.T5ForConditionalGeneration`` of the same shape (imported here: transformers is slow to load)."""
    from transformers import T5Config, T5ForConditionalGeneration
    hf_cfg = T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=0.0, layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=decoder_start_token_id, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    if not hf_cfg.is_gated_act or hf_cfg.dense_act_fn != "gelu_new":
        raise RuntimeError("transformers no longer maps feed_forward_proj='gated-gelu' to gated gelu_new")
    return T5ForConditionalGeneration(hf_cfg).eval()


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: EncDecConfig) -> dict[str, torch.Tensor]:
    """Map an MP-1 state dict of EncDecModel to T5ForConditionalGeneration names."""
    inner = cfg.num_heads * cfg.d_kv
    out = {
        "shared.weight": sd["word_embeds.weight"],
        "lm_head.weight": sd["lm_head.weight"],
        "encoder.final_layer_norm.weight": sd["encoder.final_layernorm.weight"],
        "decoder.final_layer_norm.weight": sd["decoder.final_layernorm.weight"],
    }
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n_layers):
            ours, hf = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            q, k, v = sd[ours + "self_attn.self_attn.project.weight"].split(inner, dim=0)
            out.update({hf + "0.SelfAttention.q.weight": q, hf + "0.SelfAttention.k.weight": k,
                        hf + "0.SelfAttention.v.weight": v,
                        hf + "0.SelfAttention.o.weight": sd[ours + "self_attn.self_attn.dense.weight"],
                        hf + "0.layer_norm.weight": sd[ours + "self_attn.layer_norm.weight"]})
            if i == 0:  # both store [buckets, heads]
                out[hf + "0.SelfAttention.relative_attention_bias.weight"] = \
                    sd[ours + "self_attn.self_attn.relative_attention_bias.weight"]
            ff = 1
            if stack == "decoder":
                ck, cv = sd[ours + "cross_attn.cross_attn.project_kv.weight"].split(inner, dim=0)
                out.update({hf + "1.EncDecAttention.q.weight": sd[ours + "cross_attn.cross_attn.project_q.weight"],
                            hf + "1.EncDecAttention.k.weight": ck, hf + "1.EncDecAttention.v.weight": cv,
                            hf + "1.EncDecAttention.o.weight": sd[ours + "cross_attn.cross_attn.dense.weight"],
                            hf + "1.layer_norm.weight": sd[ours + "cross_attn.layer_norm.weight"]})
                ff = 2
            for name in ("wi_0", "wi_1", "wo"):
                out[hf + f"{ff}.DenseReluDense.{name}.weight"] = sd[ours + f"ff.dense_relu_dense.{name}.weight"]
            out[hf + f"{ff}.layer_norm.weight"] = sd[ours + "ff.layer_norm.weight"]
    return out


def load_into_hf(hf_model, sd: dict[str, torch.Tensor], cfg: EncDecConfig) -> None:
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(sd, cfg), strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # views of `shared`
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"HF mapping incomplete: missing {missing}, unexpected {unexpected}")


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Weights large enough to matter: matrices N(0, std), norm weights 1 + N(0, 0.1), relative bias N(0, 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("layer_norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(std * noise)
