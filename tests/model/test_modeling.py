"""EncDecModel at MP 1: equivalence with Hugging Face T5 (and that the comparison can fail), names, masks, prompt,
param groups, fp16 robustness, activation checkpointing."""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

import mpu
from model import EncDecConfig, EncDecModel, additive_mask
from model import transformer

from hf_reference import load_into_hf, make_hf_model, randomize_

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-4

CONFIGS = {
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=120),
    # 12 heads of 8 (inner 96 != d_model), d_ff not a multiple of d_model, more decoder than encoder layers
    "odd": dict(d_model=48, d_ff=100, d_kv=8, num_heads=12, num_layers=2, num_decoder_layers=3, vocab_size=96),
    # fewer decoder layers, non-default bucketing
    "buckets": dict(d_model=32, d_ff=40, d_kv=24, num_heads=2, num_layers=3, num_decoder_layers=1, vocab_size=50,
                    relative_attention_num_buckets=16, relative_attention_max_distance=20),
}


def build_pair(name: str, seed: int = 0):
    cfg = EncDecConfig(**CONFIGS[name])
    torch.manual_seed(seed)
    ours = EncDecModel(cfg, parallel_output=False).eval()
    randomize_(ours, seed)
    hf = make_hf_model(cfg)
    load_into_hf(hf, ours.state_dict(), cfg)
    return cfg, ours, hf


def make_batch(cfg: EncDecConfig, dec_len: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    enc_lens = [37, 20, 5]  # 37 > 2 * max_exact: exercises the log-spaced buckets; padded rows 2 and 3
    enc = torch.randint(2, cfg.vocab_size, (3, max(enc_lens)), generator=gen)
    enc_mask = torch.zeros(3, max(enc_lens), dtype=torch.long)
    for row, length in enumerate(enc_lens):
        enc_mask[row, :length] = 1
    enc = enc.masked_fill(enc_mask == 0, 0)
    dec = torch.randint(2, cfg.vocab_size, (3, dec_len), generator=gen)
    return enc, enc_mask, dec


def max_diff(cfg, ours, hf, dec_len: int) -> float:
    enc, enc_mask, dec = make_batch(cfg, dec_len)
    with torch.no_grad():
        mine = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)["lm_logits"]
        ref = hf(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec).logits
    return (mine - ref).abs().max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dec_len", [1, 23])
def test_matches_hf_t5(name, dec_len):
    cfg, ours, hf = build_pair(name)
    assert max_diff(cfg, ours, hf, dec_len) < TOL


def test_matches_hf_t5_with_decoder_padding_and_4d_masks():
    cfg, ours, hf = build_pair("tiny")
    enc, enc_mask, dec = make_batch(cfg, 9)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 6:] = 0  # right padding: every query row still sees key 0
    with torch.no_grad():
        ref = hf(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        two_d = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, dec_attention_mask=dec_mask,
                     cross_attention_mask=enc_mask)["lm_logits"]
        # the original's float 4-D masks [B, 1, Lq, Lk]
        le, ld = enc.size(1), dec.size(1)
        enc_4d = enc_mask[:, None, None, :].float().expand(-1, 1, le, le)
        causal = torch.tril(torch.ones(ld, ld))
        dec_4d = causal[None, None] * dec_mask[:, None, None, :].float()
        cross_4d = enc_mask[:, None, None, :].float().expand(-1, 1, ld, le)
        four_d = ours(enc, enc_attention_mask=enc_4d, dec_input_ids=dec, dec_attention_mask=dec_4d,
                      cross_attention_mask=cross_4d.bool())["lm_logits"]
    assert (two_d - ref).abs().max().item() < TOL
    assert (four_d - ref).abs().max().item() < TOL


# -- the comparison can fail: deliberately wrong variants of our own numerics ------------------------------------

def _layer_norm_with_mean(x, weight, eps):
    x32 = x.float() - x.float().mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _bias_only_in_first_layer(monkeypatch):
    original = transformer.Block.forward

    def forward(self, h, self_bias, enc_hidden=None, cross_bias=None, past=None):
        if self.layer_index > 0:  # later layers get the mask only, no position bias: "not shared"
            q_len = h.size(1)
            self_bias = additive_mask(None, q_len=q_len, k_len=q_len, dtype=h.dtype, device=h.device,
                                      causal_offset=0 if self.is_decoder else None)
        return original(self, h, self_bias, enc_hidden, cross_bias, past)

    monkeypatch.setattr(transformer.Block, "forward", forward)


VARIANTS = {
    "scaled_scores": lambda mp: mp.setattr(transformer, "score_scale", lambda d_kv: d_kv ** -0.5),
    "relu_ff": lambda mp: mp.setattr(transformer, "gated_gelu", lambda gate, linear: F.relu(gate)),
    "bias_not_shared": _bias_only_in_first_layer,
    "norm_subtracts_mean": lambda mp: mp.setattr(transformer, "rms_norm", _layer_norm_with_mean),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_wrong_variants_exceed_tolerance(variant, monkeypatch):
    cfg, ours, hf = build_pair("tiny")
    VARIANTS[variant](monkeypatch)
    # no padding here (the bias variant builds its own mask-only bias), decoder long enough for the bias to matter
    enc = torch.randint(2, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    dec = torch.randint(2, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mine = ours(enc, dec_input_ids=dec)["lm_logits"]
        ref = hf(input_ids=enc, decoder_input_ids=dec).logits
    assert (mine - ref).abs().max().item() > 100 * TOL


# -- names and loading ----------------------------------------------------------------------------------------------

def released_names(cfg: EncDecConfig, prompt: bool = False) -> set[str]:
    """The SPEC §2 table, spelled out independently of the model code."""
    names = {"word_embeds.weight", "lm_head.weight", "encoder.final_layernorm.weight",
             "decoder.final_layernorm.weight"}
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            p = f"{stack}.blocks.{i}."
            names |= {p + "self_attn.self_attn.project.weight", p + "self_attn.self_attn.dense.weight",
                      p + "self_attn.layer_norm.weight", p + "ff.dense_relu_dense.wi_0.weight",
                      p + "ff.dense_relu_dense.wi_1.weight", p + "ff.dense_relu_dense.wo.weight",
                      p + "ff.layer_norm.weight"}
            if i == 0:
                names.add(p + "self_attn.self_attn.relative_attention_bias.weight")
            if stack == "decoder":
                names |= {p + "cross_attn.cross_attn.project_q.weight", p + "cross_attn.cross_attn.project_kv.weight",
                          p + "cross_attn.cross_attn.dense.weight", p + "cross_attn.layer_norm.weight"}
    if prompt:
        names.add("encoder.prompt_embeds.weight")
    return names


def test_state_dict_names_and_shapes_are_the_released_ones():
    cfg = EncDecConfig(**CONFIGS["odd"])
    model = EncDecModel(cfg, prompt_config={"enc": {"prompt_len": 5}})
    sd = model.state_dict()
    assert set(sd) == released_names(cfg, prompt=True)
    inner = cfg.num_heads * cfg.d_kv
    assert sd["encoder.blocks.0.self_attn.self_attn.project.weight"].shape == (3 * inner, cfg.d_model)
    assert sd["decoder.blocks.1.cross_attn.cross_attn.project_kv.weight"].shape == (2 * inner, cfg.d_model)
    assert sd["decoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight"].shape == (32, cfg.num_heads)
    assert sd["encoder.blocks.1.ff.dense_relu_dense.wo.weight"].shape == (cfg.d_model, cfg.d_ff)
    assert sd["encoder.prompt_embeds.weight"].shape == (5, cfg.d_model)


def test_released_state_dict_with_aliases_loads_strict():
    cfg = EncDecConfig(**CONFIGS["tiny"])
    source = EncDecModel(cfg)
    randomize_(source, 7)
    released = dict(source.state_dict())
    released["encoder.word_embeds.weight"] = released["word_embeds.weight"]
    released["decoder.word_embeds.weight"] = released["word_embeds.weight"]
    target = EncDecModel(cfg)
    target.load_state_dict(released, strict=True)
    for name, value in target.state_dict().items():
        assert torch.equal(value, released[name]), name
    with pytest.raises(RuntimeError):  # other unexpected keys still fail strict loading
        target.load_state_dict({**released, "encoder.bogus.weight": torch.zeros(1)}, strict=True)


def test_init_statistics():
    cfg = EncDecConfig(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=6, vocab_size=512,
                       init_method_std=0.02)
    sd = EncDecModel(cfg).state_dict()
    assert abs(sd["word_embeds.weight"].std().item() - 0.02) < 0.002
    out_std = 0.02 / (2 * 6) ** 0.5
    assert abs(sd["decoder.blocks.3.ff.dense_relu_dense.wo.weight"].std().item() - out_std) < 0.1 * out_std
    assert abs(sd["encoder.blocks.2.self_attn.self_attn.dense.weight"].std().item() - out_std) < 0.1 * out_std
    assert torch.equal(sd["encoder.final_layernorm.weight"], torch.ones(128))


# -- configs -------------------------------------------------------------------------------------------------------

def test_shipped_configs(tmp_path):
    big = EncDecConfig.from_json_file(str(ROOT / "configs/model/cpm2_config.json"))
    assert (big.d_model, big.d_ff, big.d_kv, big.num_heads, big.num_layers, big.num_decoder_layers) == \
        (4096, 10240, 64, 64, 24, 24)
    assert big.dropout_rate == 0.0 and big.init_method_std == 0.001 and big.vocab_size is None
    assert EncDecConfig.from_json_file(str(ROOT / "configs/model/cpm2_config_drop.json")).dropout_rate == 0.1
    tiny = EncDecConfig.from_json_file(str(ROOT / "configs/model/tiny_config.json"))
    assert (tiny.d_model, tiny.num_heads, tiny.init_method_std) == (64, 4, 0.02)
    path = tmp_path / "c.json"
    path.write_text('{"d_model": 8, "d_ff": 16, "d_kv": 4, "num_heads": 2, "num_layers": 3, "made_up": 1}')
    cfg = EncDecConfig.from_json_file(str(path))
    assert cfg.num_decoder_layers == 3 and not hasattr(cfg, "made_up")


def test_vocab_size_required():
    with pytest.raises(ValueError, match="vocab_size"):
        EncDecModel(EncDecConfig(**{**CONFIGS["tiny"], "vocab_size": None}))


def test_mp_size_refusal_names_value_rule_and_choices(monkeypatch):
    with pytest.raises(ValueError) as err:
        mpu.check_model_parallel_size(6, {"num_heads": 64, "d_ff": 10240, "vocab_size": 51968})
    message = str(err.value)
    assert "model-parallel size 6 does not divide" in message and "vocab_size 51968" in message
    assert "num_heads 64" in message and "use 1, 2, 4, 8, 16, 32 or 64" in message
    monkeypatch.setattr(mpu, "get_model_parallel_world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"model-parallel size 3 does not divide num_heads 4.*use 1, 2 or 4"):
        EncDecModel(EncDecConfig(**{**CONFIGS["tiny"], "vocab_size": 128}))


# -- forward contract ----------------------------------------------------------------------------------------------

def test_forward_contract_and_no_distributed_init():
    assert not torch.distributed.is_initialized() and mpu.get_model_parallel_world_size() == 1
    cfg, ours, _ = build_pair("tiny")
    enc, enc_mask, dec = make_batch(cfg, 4)
    enc_only = ours(enc, enc_attention_mask=enc_mask, only_encoder=True)
    assert enc_only["lm_logits"] is None and enc_only["encoder_last_hidden_state"].shape == (3, 37, 64)
    out = ours(enc_hidden_states=enc_only["encoder_last_hidden_state"], dec_input_ids=dec,
               cross_attention_mask=enc_mask)
    assert out["lm_logits"].shape == (3, 4, cfg.vocab_size)
    full = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)
    torch.testing.assert_close(out["lm_logits"], full["lm_logits"])
    with pytest.raises(ValueError, match="dec_input_ids"):
        ours(enc)
    with pytest.raises(ValueError, match="enc_attention_mask"):
        ours(enc, enc_attention_mask=enc_mask[:, :5], dec_input_ids=dec)


def test_fully_masked_rows_stay_finite():
    cfg, ours, _ = build_pair("tiny")
    enc, enc_mask, dec = make_batch(cfg, 3)
    dead = torch.zeros(3, 1, 3, enc.size(1))  # cross mask hiding every encoder position
    with torch.no_grad():
        out = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=dead)
    assert torch.isfinite(out["lm_logits"]).all()


def test_soft_prompt_reads_prompt_rows():
    cfg = EncDecConfig(**CONFIGS["tiny"])
    model = EncDecModel(cfg, prompt_config={"enc": {"prompt_len": 3}}).eval()
    ids = torch.tensor([[-1, -2, 5, -3, 7]])
    embeds = model.embed_encoder_input(ids)
    prompt = model.encoder.prompt_embeds.weight
    torch.testing.assert_close(embeds[0, [0, 1, 3]], prompt[[0, 1, 2]])
    torch.testing.assert_close(embeds[0, [2, 4]], model.word_embeds.weight[[5, 7]])
    out = model(ids, dec_input_ids=torch.tensor([[1, 2]]))
    out["lm_logits"].sum().backward()
    assert model.encoder.prompt_embeds.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompt"):
        model.embed_encoder_input(torch.tensor([[-4, 1]]))
    with pytest.raises(ValueError, match="prompt"):
        EncDecModel(cfg)(torch.tensor([[-1, 3]]), dec_input_ids=torch.tensor([[1]]))


def test_param_groups():
    cfg = EncDecConfig(**CONFIGS["tiny"])
    model = EncDecModel(cfg, prompt_config={"enc": {"prompt_len": 4}})
    groups = model.param_groups(0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert all("layer_norm" in n or "layernorm" in n or "relative_attention_bias" in n for n in no_decay)
    assert "encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight" in no_decay
    assert "encoder.prompt_embeds.weight" in decay
    (prompt_group,) = model.param_groups(0.0, prompt_only=True)
    assert prompt_group["params"] == [model.encoder.prompt_embeds.weight]
    with pytest.raises(ValueError, match="soft prompt"):
        EncDecModel(cfg).param_groups(0.0, prompt_only=True)


# -- fp16 and activation checkpointing -------------------------------------------------------------------------------

def test_fp16_feed_forward_stays_finite():
    cfg = EncDecConfig(**CONFIGS["tiny"])
    ff = transformer.GatedGeluFeedForward(cfg, init_method=mpu.init_method_normal(0.02),
                                          output_init_method=mpu.init_method_normal(0.02))
    with torch.no_grad():
        ff.wi_0.weight.fill_(0.5)
        ff.wi_1.weight.fill_(0.5)
        ff.wo.weight.fill_(1e-4)
    x = torch.full((1, 2, cfg.d_model), 10.0)  # gate = linear = 320: product 102400 > fp16 max 65504
    reference = ff(x)  # fp32
    ff_half = ff.half()
    naive = F.linear(transformer.gated_gelu(ff_half.wi_0(x.half()), ff_half.wi_1(x.half())), ff_half.wo.weight)
    assert not torch.isfinite(naive).all()  # a naive fp16 FF overflows here
    out = ff_half(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=2e-3, atol=1e-2)


def test_fp16_model_forward_is_finite_and_close():
    cfg, ours, _ = build_pair("tiny")
    enc, enc_mask, dec = make_batch(cfg, 5)
    with torch.no_grad():
        ref = ours(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)["lm_logits"]
        half = ours.half()(enc, enc_attention_mask=enc_mask, dec_input_ids=dec,
                           cross_attention_mask=enc_mask)["lm_logits"]
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_activation_checkpointing_gives_identical_grads():
    cfg = EncDecConfig(**{**CONFIGS["tiny"], "dropout_rate": 0.1})
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = EncDecModel(cfg, checkpoint_activations=checkpointed).train()
        randomize_(model, 5)
        enc, enc_mask, dec = make_batch(cfg, 6)
        mpu.model_parallel_seed(11)  # same dropout masks in both runs
        out = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)
        assert (out["past_key_values"] is None) == checkpointed
        loss = mpu.vocab_parallel_cross_entropy(out["lm_logits"], torch.roll(dec, 1, dims=1)).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_training_forward_embeds_encoder_and_decoder_in_one_lookup_with_the_same_result(monkeypatch, prompt_len):
    """Training looks the encoder and decoder ids up in one call (one dense gradient for the shared table);
    loss and every gradient equal the two separate lookups, prompt positions included."""
    cfg = EncDecConfig(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=64,
                       dropout_rate=0.0)
    prompt = {"enc": {"prompt_len": prompt_len}} if prompt_len else None
    torch.manual_seed(0)
    model = EncDecModel(cfg, parallel_output=False, prompt_config=prompt).train()
    randomize_(model, 1)
    gen = torch.Generator().manual_seed(4)
    enc = torch.randint(1, 64, (3, 9), generator=gen)
    if prompt_len:
        enc[:, :prompt_len] = -torch.arange(1, prompt_len + 1)
    dec, labels = torch.randint(1, 64, (3, 5), generator=gen), torch.randint(1, 64, (3, 5), generator=gen)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(enc_input_ids=enc, dec_input_ids=dec)["lm_logits"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    real = model._embed_both
    monkeypatch.setattr(model, "_embed_both", lambda *a: calls.append(1) or real(*a))
    loss, grads = loss_and_grads()
    assert calls == [1]
    monkeypatch.setattr(model, "_embed_both", lambda e, d: (model.word_embeds(e.clamp(min=0)), model.word_embeds(d)))
    loss_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.setattr(model, "_embed_both", real)
    with pytest.raises(ValueError, match="dec_input_ids holds ids"):  # the ids are still checked first
        model(enc_input_ids=enc, dec_input_ids=dec + 64)
