"""model/attention_ops.py: the training-path head split and biased attention equal what they replace, and a
training step's gradients equal Hugging Face T5's (the independent reference) through them."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import EncDecConfig, EncDecModel
from model import attention_ops, transformer

from hf_reference import load_into_hf, make_hf_model, randomize_, to_hf_state_dict


def _plain_split(x, parts, heads, d_kv):
    b, length, _ = x.shape
    return tuple(x.view(b, length, parts, heads, d_kv).permute(2, 0, 3, 1, 4).unbind(0))


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)], ids=["all-parts", "one-part-unused"])
def test_split_heads_values_and_gradient(used):
    torch.manual_seed(0)
    b, length, parts, heads, d_kv = 2, 5, 3, 4, 6
    x = torch.randn(b, length, parts * heads * d_kv, requires_grad=True)
    upstream = [torch.randn(b, heads, length, d_kv) for _ in range(parts)]
    grads = []
    for split in (attention_ops.split_heads, _plain_split):
        x.grad = None
        outs = split(x, parts, heads, d_kv)
        assert [o.shape for o in outs] == [(b, heads, length, d_kv)] * parts
        sum((outs[i] * upstream[i]).sum() for i in used).backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("bias_shape", ["BH", "1H", "B1", "none", "B1-no-grad"])
def test_biased_attention_matches_sdpa(bias_shape):
    torch.manual_seed(0)
    b, heads, q_len, k_len, d_kv = 3, 4, 7, 9, 8
    q, k, v = (torch.randn(b, heads, n, d_kv, requires_grad=True) for n in (q_len, k_len, k_len))
    bias, inputs = None, (q, k, v)
    if bias_shape != "none":
        shape = {"BH": (b, heads), "1H": (1, heads), "B1": (b, 1)}[bias_shape[:2]] + (q_len, k_len)
        bias = torch.randn(shape)
        bias[0, ..., 2, :] = torch.finfo(torch.float32).min / 2  # a fully masked query row, as additive_mask makes
        if not bias_shape.endswith("no-grad"):  # position bias (trained) vs a plain mask (cross-attention)
            bias.requires_grad_(True)
            inputs = (q, k, v, bias)
    upstream = torch.randn(b, heads, q_len, d_kv)
    results = []
    for ours in (True, False):
        # reference: SDPA's math backend (its definition; the flash kernel treats a fully masked row differently)
        with contextlib.nullcontext() if ours else sdpa_kernel(SDPBackend.MATH):
            out = attention_ops.biased_attention(q, k, v, bias) if ours else \
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        results.append((out, *grads))
    for ours, ref in zip(*results):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_training_gradients_match_hf_t5_through_the_new_ops(monkeypatch):
    calls = {"split": 0, "attention": 0}
    for name, key in (("split_heads", "split"), ("biased_attention", "attention")):
        original = getattr(transformer, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(transformer, name, counted)
    cfg = EncDecConfig(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                       vocab_size=120, dropout_rate=0.0)
    torch.manual_seed(0)
    ours = EncDecModel(cfg, parallel_output=False).train()
    randomize_(ours, 0)
    hf = make_hf_model(cfg).train()
    load_into_hf(hf, ours.state_dict(), cfg)
    gen = torch.Generator().manual_seed(1)
    enc = torch.randint(2, cfg.vocab_size, (3, 11), generator=gen)
    enc_mask = torch.ones(3, 11, dtype=torch.long)
    enc_mask[1, 8:] = 0
    dec = torch.randint(2, cfg.vocab_size, (3, 5), generator=gen)
    labels = torch.randint(2, cfg.vocab_size, (3, 5), generator=gen)
    logits = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)["lm_logits"]
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    hf_logits = hf(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec).logits
    F.cross_entropy(hf_logits.flatten(0, 1), labels.flatten()).backward()
    assert calls["split"] >= 6 and calls["attention"] == 6  # 2 encoder, 2 decoder self- and 2 cross-attentions
    with torch.no_grad():  # evaluation keeps SDPA (flash kernels, no materialised scores)
        ours.eval()(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)
    assert calls["attention"] == 6
    our_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, cfg)
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert set(our_grads) == set(hf_grads)
    for name, grad in hf_grads.items():
        # fp32 sums in a different order: compare against the tensor's own scale
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


def test_frozen_attention_keeps_sdpa_in_prompt_tuning(monkeypatch):
    """fix_model (only the soft prompt trains): no attention trains, so none materialises its scores for a backward;
    SDPA's flash kernel stays (prompt tuning's memory advantage). The same model fully trained uses the GEMM path."""
    calls = []
    original = transformer.biased_attention
    monkeypatch.setattr(transformer, "biased_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = EncDecConfig(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=60)
    model = EncDecModel(cfg, prompt_config={"enc": {"prompt_len": 3}}).train()
    ids, dec = torch.tensor([[-1, -2, -3, 5, 7, 9]]), torch.tensor([[1, 2, 3]])
    for name, p in model.named_parameters():
        p.requires_grad_(name == "encoder.prompt_embeds.weight")
    model(ids, dec_input_ids=dec)["lm_logits"].sum().backward()
    assert calls == [] and model.encoder.prompt_embeds.weight.grad.abs().sum() > 0
    for p in model.parameters():
        p.requires_grad_(True)
    model(ids, dec_input_ids=dec)["lm_logits"].sum().backward()
    assert len(calls) == 6  # 2 encoder, 2 decoder self-, 2 cross-attentions


def test_biased_attention_bf16_normalises_in_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    bias = torch.randn(2, 3, 5, 7) * 4
    ref = attention_ops.biased_attention(q, k, v, bias)
    low = attention_ops.biased_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
