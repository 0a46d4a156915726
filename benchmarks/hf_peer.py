"""The benchmark peer: Hugging Face `T5ForConditionalGeneration` with our config and our weights (SPEC §2 mapping).

The weights go through the project's HF name mapping (`model/checkpoint_hf.py`); a benchmark never times a peer
that computes something else: `check_same_function` compares the logits of both models once before any timing.
"""
from __future__ import annotations

import torch

from model import EncDecConfig, EncDecModel

# Token roles of the HF twin (T5 convention): decoding starts from pad; eos is never reached in the benchmarks
# because min_length = max_length disables stopping.
HF_PAD_ID, HF_EOS_ID, HF_START_ID = 0, 1, 0


def make_hf_model(cfg: EncDecConfig, *, dtype: torch.dtype = torch.float32):
    """An untrained HF T5 v1.1 twin of `cfg` (gated GeLU-tanh FF, untied head, no dropout), configured by the
    project's one HF config mapping (`model.checkpoint_hf.hf_config_for`, as `--to-hf` writes it)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from model.checkpoint_hf import hf_config_for

    config = hf_config_for(cfg.to_dict(), vocab_size=cfg.vocab_size, dtype=dtype, pad_token_id=HF_PAD_ID,
                           eos_token_id=HF_EOS_ID, decoder_start_token_id=HF_START_ID)
    hf_cfg = T5Config.from_dict({**config, "dropout_rate": 0.0})  # the peer never drops out, whatever cfg says
    if not hf_cfg.is_gated_act or hf_cfg.dense_act_fn != "gelu_new":
        raise RuntimeError("transformers no longer maps feed_forward_proj='gated-gelu' to gated gelu_new (tanh); "
                           "the peer would compute a different FF")
    return T5ForConditionalGeneration(hf_cfg).to(dtype)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: EncDecConfig) -> dict[str, torch.Tensor]:
    """An MP-1 `EncDecModel` state dict -> `T5ForConditionalGeneration` names (cloned: the twins share nothing).

    The project's one name mapping (`model.checkpoint_hf.full_to_hf`, also used by tools/convert_checkpoint.py);
    `check_same_function` then proves on logits that the peer computes what ours does before anything is timed.
    """
    from model.checkpoint_hf import full_to_hf

    del cfg  # the mapping needs only the names
    return {k: v.detach().clone().contiguous() for k, v in full_to_hf(sd).items()}


def build_pair(cfg: EncDecConfig, *, seed: int = 1234, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", prompt_config: dict | None = None):
    """(ours, hf): our model from `seed` and its HF twin holding the same weights, both on `device` in `dtype`."""
    torch.manual_seed(seed)
    ours = EncDecModel(cfg, parallel_output=True, prompt_config=prompt_config)
    sd = {k: v for k, v in ours.state_dict().items() if k != "encoder.prompt_embeds.weight"}
    hf = make_hf_model(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(sd, cfg), strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # views of `shared`
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"HF mapping incomplete: missing {missing}, unexpected {unexpected}")
    return ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)


@torch.no_grad()
def check_same_function(ours, hf, enc_ids: torch.Tensor, dec_ids: torch.Tensor, *, atol: float = 1e-3) -> float:
    """Max |logit difference| of the twins on one batch; raises if they disagree (a wrong peer is no peer)."""
    was = ours.training, hf.training
    ours.eval(), hf.eval()
    a = ours(enc_input_ids=enc_ids, dec_input_ids=dec_ids)["lm_logits"].float()
    b = hf(input_ids=enc_ids, decoder_input_ids=dec_ids, use_cache=False).logits.float()
    ours.train(was[0]), hf.train(was[1])
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    if not diff <= atol * max(1.0, scale):
        raise RuntimeError(f"the HF peer disagrees with our model: max |logit diff| {diff:.3g} (logit scale "
                           f"{scale:.3g}); fix benchmarks/hf_peer.py before timing anything")
    return diff
