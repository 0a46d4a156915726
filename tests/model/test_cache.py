"""Incremental decoding: cached steps give the full forward's logits; cross K/V are computed once; beam reorder."""
import torch

from model import EncDecConfig, EncDecModel

from hf_reference import randomize_

CFG = dict(d_model=48, d_ff=72, d_kv=8, num_heads=6, num_layers=2, num_decoder_layers=3, vocab_size=80)
TOL = 1e-5


def _setup():
    cfg = EncDecConfig(**CFG)
    torch.manual_seed(0)
    model = EncDecModel(cfg, parallel_output=False).eval()
    randomize_(model, 1)
    gen = torch.Generator().manual_seed(2)
    enc = torch.randint(1, 80, (2, 13), generator=gen)
    enc_mask = torch.ones(2, 13, dtype=torch.long)
    enc_mask[1, 8:] = 0
    dec = torch.randint(1, 80, (2, 22), generator=gen)  # 22 > 16 exact causal buckets
    return model, enc, enc_mask, dec


def _count_project_kv(model):
    calls = []
    for block in model.decoder.blocks:
        block.cross_attn.cross_attn.project_kv.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def test_cached_steps_equal_full_forward_and_cross_kv_is_computed_once():
    model, enc, enc_mask, dec = _setup()
    full = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)["lm_logits"]
    calls = _count_project_kv(model)
    enc_hidden = model(enc, enc_attention_mask=enc_mask, only_encoder=True)["encoder_last_hidden_state"]
    prefix = 2  # like [<s>, <s_0>]
    out = model(enc_hidden_states=enc_hidden, dec_input_ids=dec[:, :prefix], cross_attention_mask=enc_mask)
    torch.testing.assert_close(out["lm_logits"], full[:, :prefix], rtol=0, atol=TOL)
    assert len(calls) == len(model.decoder.blocks)
    past = out["past_key_values"]
    for step in range(prefix, dec.size(1)):
        out = model(dec_input_ids=dec[:, step:step + 1], past_key_values=past, cross_attention_mask=enc_mask)
        torch.testing.assert_close(out["lm_logits"][:, 0], full[:, step], rtol=0, atol=TOL)
        past = out["past_key_values"]
        assert past[0]["self_k"].shape == (2, 6, step + 1, 8) and past[2]["cross_v"].shape == (2, 6, 13, 8)
    assert len(calls) == len(model.decoder.blocks)  # never recomputed after the first step


@torch.no_grad()
def test_cache_with_padding_masks_and_multi_token_steps():
    model, enc, enc_mask, dec = _setup()
    dec_mask = torch.ones_like(dec)
    full = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, dec_attention_mask=dec_mask,
                 cross_attention_mask=enc_mask)["lm_logits"]
    out = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec[:, :5], dec_attention_mask=dec_mask[:, :5],
                cross_attention_mask=enc_mask)
    past = out["past_key_values"]
    # 3 tokens at once with a 2-D key-padding mask over all positions so far
    out = model(dec_input_ids=dec[:, 5:8], dec_attention_mask=dec_mask[:, :8], past_key_values=past,
                cross_attention_mask=enc_mask)
    torch.testing.assert_close(out["lm_logits"], full[:, 5:8], rtol=0, atol=TOL)
    # a full-length 4-D mask: the last rows are used
    causal = torch.tril(torch.ones(9, 9))[None, None].expand(2, 1, 9, 9)
    out = model(dec_input_ids=dec[:, 8:9], dec_attention_mask=causal, past_key_values=out["past_key_values"],
                cross_attention_mask=enc_mask)
    torch.testing.assert_close(out["lm_logits"][:, 0], full[:, 8], rtol=0, atol=TOL)


@torch.no_grad()
def test_reorder_cache_for_beams():
    model, enc, enc_mask, dec = _setup()
    beam_idx = torch.tensor([1, 1, 0])
    full = model(enc[beam_idx], enc_attention_mask=enc_mask[beam_idx], dec_input_ids=dec[beam_idx, :7],
                 cross_attention_mask=enc_mask[beam_idx])["lm_logits"]
    out = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec[:, :6], cross_attention_mask=enc_mask)
    past = model.reorder_cache(out["past_key_values"], beam_idx)
    assert past[1]["cross_k"].shape[0] == 3
    step = model(dec_input_ids=dec[beam_idx, 6:7], past_key_values=past, cross_attention_mask=enc_mask[beam_idx])
    torch.testing.assert_close(step["lm_logits"][:, 0], full[:, 6], rtol=0, atol=TOL)
