"""The fast paths equal the plain ones: oneDNN linear (mpu/fast_linear.py) vs F.linear, the growable decode cache
and single-query attention (model/fast_inference.py) vs torch.cat + SDPA, the decode bias table vs the bucket maths,
and generate with the fast paths vs without them."""
import pytest
import torch
import torch.nn.functional as F

from model import EncDecConfig, EncDecModel
from model.fast_inference import (GrowableLayerCache, append_kv, make_growable, reorder_growable,
                                  single_query_attention)
from model.generation import GenerationConfig, generate
from mpu import fast_linear

from hf_reference import randomize_

CFG = dict(d_model=48, d_ff=72, d_kv=8, num_heads=6, num_layers=2, num_decoder_layers=3, vocab_size=80)
TOL = 1e-5

needs_onednn = pytest.mark.skipif(not fast_linear._ENABLED, reason="oneDNN linear unavailable or disabled")


def _model():
    torch.manual_seed(0)
    model = EncDecModel(EncDecConfig(**CFG), parallel_output=False).eval()
    randomize_(model, 1)
    gen = torch.Generator().manual_seed(2)
    enc = torch.randint(1, 80, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    return model, enc, mask


# -- oneDNN linear ---------------------------------------------------------------------------------------------

@needs_onednn
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (1, 1, 48)])
def test_linear_paths_equal_f_linear(shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(33, 48))
    x = torch.randn(*shape)
    ref = F.linear(x, weight)
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear.linear(x, weight), ref, rtol=0, atol=TOL)  # packed weight
    with torch.no_grad():
        torch.testing.assert_close(fast_linear.linear(x, weight), ref, rtol=0, atol=TOL)  # dense weight
    xt = torch.randn(48, shape[0]).t()  # a transposed (non-contiguous) input
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear.linear(xt, weight), F.linear(xt, weight), rtol=0, atol=TOL)


@needs_onednn
def test_linear_autograd_equals_f_linear_and_output_is_writable():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(33, 48))
    w2 = torch.nn.Parameter(w1.detach().clone())
    x1 = torch.randn(2, 7, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = fast_linear.linear(x1, w1), F.linear(x2, w2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=TOL)
    y1[..., 3] += 1.0  # in-place on the output must stay legal (generation tests rely on it)
    y2[..., 3] += 1.0
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_packed_weight_follows_in_place_updates():
    """An optimizer step or load_state_dict changes the weight in place: the packed copy must not go stale."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 8)
    with torch.inference_mode():
        fast_linear.linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2.0)
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear.linear(x, weight), F.linear(x, weight), rtol=0, atol=TOL)
    weight.data = torch.randn(16, 8)  # new storage, no version bump
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear.linear(x, weight), F.linear(x, weight), rtol=0, atol=TOL)


def test_linear_falls_back_for_other_dtypes():
    weight = torch.randn(16, 8, dtype=torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fast_linear.linear(x, weight), F.linear(x, weight))


# -- decode cache and attention ----------------------------------------------------------------------------------

def test_single_query_attention_equals_sdpa():
    torch.manual_seed(0)
    q = torch.randn(3, 1, 3, 4, 8)[:, :, 0].permute(0, 2, 1, 3)  # [3, 4, 1, 8], a strided view as in the model
    k, v = torch.randn(3, 4, 9, 8), torch.randn(3, 4, 9, 8)
    bias = torch.randn(3, 4, 1, 9)
    bias[1, :, :, 5:] = torch.finfo(torch.float32).min / 2
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    torch.testing.assert_close(single_query_attention(q, k, v, bias), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(single_query_attention(q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, scale=1.0), rtol=0, atol=1e-6)
    # beams: 3 examples x 2 beams share one K/V row per example
    qb = torch.randn(6, 4, 1, 8)
    bias_b = bias.repeat_interleave(2, dim=0)
    ref = F.scaled_dot_product_attention(qb, k.repeat_interleave(2, dim=0), v.repeat_interleave(2, dim=0),
                                         attn_mask=bias_b, scale=1.0)
    torch.testing.assert_close(single_query_attention(qb, k, v, bias_b), ref, rtol=0, atol=1e-6)


def test_append_kv_equals_cat_and_falls_back_when_full():
    torch.manual_seed(0)
    past = [{"self_k": torch.randn(2, 3, 4, 5), "self_v": torch.randn(2, 3, 4, 5),
             "cross_k": torch.randn(2, 3, 6, 5), "cross_v": torch.randn(2, 3, 6, 5)}]
    grown = make_growable(past, capacity=6)
    assert isinstance(grown[0], GrowableLayerCache)
    k = grown[0]["self_k"]
    for _ in range(3):  # 2 in place, then the buffer is full: cat
        new = torch.randn(2, 3, 1, 5)
        expected = torch.cat([k, new], dim=2)
        k = append_kv(k, new)
        assert torch.equal(k, expected)
    # reorder: same rows as index_select of the filled part
    rows = torch.tensor([1, 1])
    reordered, spare = reorder_growable(grown, rows, None)
    assert torch.equal(reordered[0]["self_v"], past[0]["self_v"].index_select(0, rows))
    again, _ = reorder_growable(reordered, torch.tensor([1, 0]), spare)  # into the spare buffers
    assert torch.equal(again[0]["self_v"], past[0]["self_v"].index_select(0, torch.tensor([1, 1])))


@torch.no_grad()
def test_growable_decode_equals_concat_decode():
    model, enc, mask = _model()
    dec = torch.randint(1, 80, (3, 20), generator=torch.Generator().manual_seed(3))
    first = model(enc, enc_attention_mask=mask, dec_input_ids=dec[:, :2], cross_attention_mask=mask)
    plain = first["past_key_values"]
    grown = make_growable(plain, capacity=24)
    for step in range(2, dec.size(1)):
        a = model(dec_input_ids=dec[:, step:step + 1], past_key_values=plain, cross_attention_mask=mask)
        b = model(dec_input_ids=dec[:, step:step + 1], past_key_values=grown, cross_attention_mask=mask)
        torch.testing.assert_close(b["lm_logits"], a["lm_logits"], rtol=0, atol=TOL)
        plain, grown = a["past_key_values"], b["past_key_values"]
        assert isinstance(grown[0], GrowableLayerCache) and not isinstance(plain[0], GrowableLayerCache)
        assert torch.equal(grown[1]["self_k"], plain[1]["self_k"])


@torch.no_grad()
def test_decode_bias_table_equals_bucket_maths():
    model, _, _ = _model()
    attn = model.decoder.blocks[0].self_attn.self_attn
    for offset in (0, 5, 70):  # 70 grows the table past its first size
        table = attn.position_bias(1, offset + 1, offset, torch.device("cpu"))
        assert torch.equal(table, attn._position_bias(1, offset + 1, offset, torch.device("cpu")))
    with torch.no_grad():
        attn.relative_attention_bias.weight.add_(1.0)  # a weight update rebuilds the table
    assert torch.equal(attn.position_bias(1, 9, 8, torch.device("cpu")),
                       attn._position_bias(1, 9, 8, torch.device("cpu")))


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_fast_paths_equal_plain_paths(beams, monkeypatch):
    """generate (oneDNN + growable cache + bmm attention) gives the tokens of F.linear + cat + SDPA."""
    import model.transformer as transformer

    model, enc, mask = _model()
    config = GenerationConfig(max_length=9, min_length=9, num_beams=beams, eos_id=1, pad_id=0, decoder_prefix=[0])
    fast = generate(model, enc, mask, config)
    previous = fast_linear.set_enabled(False)
    try:
        def sdpa(q, k, v, bias):  # beams share cross K/V rows: repeat them for SDPA
            k, v = (t.repeat_interleave(q.size(0) // t.size(0), dim=0) for t in (k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)

        monkeypatch.setattr(transformer, "single_query_attention", sdpa)
        monkeypatch.setattr("model.generation.cached_decoder.make_growable", lambda past, capacity: past)
        plain = generate(model, enc, mask, config)
    finally:
        fast_linear.set_enabled(previous)
    assert torch.equal(fast, plain)
