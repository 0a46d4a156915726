"""model/generation: cached decoding against uncached references, HF T5 `generate()`, and the scoring helpers.

A tiny random model (d_model 64, 2+2 layers, vocab 128) with large embedding / head weights so the choices vary.
The stop token is picked from the model's own greedy output so that rows actually stop at different steps.
"""
from __future__ import annotations

import collections

import pytest
import torch

from model import EncDecConfig, EncDecModel
from model.generation import GenerationConfig, generate, score_candidates, score_token_logit
from model.generation.beam_search import beam_search
from model.generation.cached_decoder import CachedDecoder
from model.generation.processors import ban_repeated_ngrams, sample_tokens
from model.generation.search import greedy_or_sample

VOCAB, PAD, PREFIX = 128, 0, (1, 3)  # prefix plays [<s>, <s_0>]


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with test_generation_parallel.py

def tiny_config() -> EncDecConfig:
    return EncDecConfig(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=VOCAB,
                        init_method_std=0.2)


def build_tiny_model(seed: int = 0, **kwargs) -> EncDecModel:
    torch.manual_seed(seed)
    model = EncDecModel(tiny_config(), **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    full = {name: torch.randn(VOCAB, 64, generator=gen) * 0.5 for name in ("word_embeds", "lm_head")}
    with torch.no_grad():  # row-sliced so this works on vocab-parallel shards too
        for name, weight in full.items():
            local = getattr(model, name).weight
            start = local.size(0) * _mp_rank()
            local.copy_(weight[start:start + local.size(0)])
    return model.eval()


def _mp_rank() -> int:
    import mpu
    return mpu.get_model_parallel_rank()


def encoder_batch(seed: int = 0, batch: int = 3, length: int = 9):
    """Random encoder ids with right padding of different lengths; returns (ids [B, Le], mask [B, Le])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (batch, length), generator=gen)
    lengths = [length - (3 * i) % length for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


def pick_eos(model, ids, mask, max_length: int = 12, num_beams: int = 1) -> int:
    """A token of the model's own eos-free greedy output (after step 0) found in as many rows as possible, earliest
    first: rows then stop at different steps before max_length."""
    cfg = GenerationConfig(max_length, eos_id=VOCAB - 1, pad_id=PAD, decoder_prefix=PREFIX, min_length=max_length,
                           num_beams=num_beams)
    rows = generate(model, ids, mask, cfg)[:, 1:].tolist()
    first: dict[int, list[int]] = collections.defaultdict(list)  # token -> first index in each row holding it
    for row in rows:
        for token in set(row):
            first[token].append(row.index(token))
    return min(first, key=lambda t: (-len(first[t]), max(first[t]), t))


def trim(rows: torch.Tensor, eos: int) -> list[list[int]]:
    """Rows cut after their first eos (padding conventions differ between implementations)."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Uncached references: rerun the whole decoder on the full sequence every step

def _full_logits(model, ids, mask, seqs: list[list[int]]) -> torch.Tensor:
    """Last-position fp32 logits [N, V] of the decoder on seqs (all of one length), no cache."""
    n = len(seqs)
    out = model(enc_input_ids=ids.expand(n, -1) if ids.size(0) == 1 else ids,
                enc_attention_mask=None if mask is None else (mask.expand(n, -1) if mask.size(0) == 1 else mask),
                dec_input_ids=torch.tensor(seqs), cross_attention_mask=None if mask is None else
                (mask.expand(n, -1) if mask.size(0) == 1 else mask))
    return out["lm_logits"][:, -1, :].float()


def _constrain(scores: torch.Tensor, seqs: list[list[int]], step: int, cfg: GenerationConfig) -> None:
    """Plain-Python min_length and no-repeat n-gram (independent of model.generation.processors)."""
    n = cfg.no_repeat_ngram_size
    for row, seq in enumerate(seqs):
        if step < cfg.min_length:
            scores[row, cfg.eos_id] = float("-inf")
        if n and len(seq) >= n:
            tail = seq[len(seq) - n + 1:]
            for i in range(len(seq) - n + 1):
                if seq[i:i + n - 1] == tail:
                    scores[row, seq[i + n - 1]] = float("-inf")


@torch.no_grad()
def slow_greedy(model, ids, mask, cfg: GenerationConfig) -> list[list[int]]:
    seqs = [list(cfg.decoder_prefix) for _ in range(ids.size(0))]
    done = [False] * ids.size(0)
    for step in range(cfg.max_length):
        scores = _full_logits(model, ids, mask, seqs)
        _constrain(scores, seqs, step, cfg)
        for row, token in enumerate(scores.argmax(-1).tolist()):
            seqs[row].append(cfg.pad_id if done[row] else token)
            done[row] = done[row] or token == cfg.eos_id
        if all(done):
            break
    return [s[len(cfg.decoder_prefix):] for s in seqs]


@torch.no_grad()
def slow_beam(model, ids, mask, cfg: GenerationConfig) -> list[int]:
    """Beam search for one example [1, Le], HF v4.57 semantics with early_stopping=True, written plainly."""
    k, prefix = cfg.num_beams, list(cfg.decoder_prefix)
    beams = [(prefix, 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(cfg.max_length):
        seqs = [s for s, _ in beams]
        log_probs = torch.log_softmax(_full_logits(model, ids, mask, seqs), dim=-1)
        _constrain(log_probs, seqs, step, cfg)
        cands = [(score + lp, i, v) for i, (_, score) in enumerate(beams)
                 for v, lp in enumerate(log_probs[i].tolist())]
        cands.sort(key=lambda c: -c[0])
        last = step + 1 == cfg.max_length
        done = len(finished) >= k
        next_beams = []
        for rank, (score, i, v) in enumerate(cands[: 2 * k]):
            if last or v == cfg.eos_id:
                if rank < k and not done:
                    finished.append((score / (step + 1) ** cfg.length_penalty, seqs[i][len(prefix):] + [v]))
            elif len(next_beams) < k:
                next_beams.append((seqs[i] + [v], score))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if last or len(finished) >= k:
            break
        beams = next_beams
    return finished[0][1]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a loaded 2-core machine OpenMP spinning makes them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(0)


@pytest.fixture(scope="module")
def batch():
    return encoder_batch(0)


@pytest.fixture(scope="module")
def eos(model, batch):
    return pick_eos(model, *batch)


def gen_config(eos: int, max_length: int = 12, **kw) -> GenerationConfig:
    return GenerationConfig(max_length, eos_id=eos, pad_id=PAD, decoder_prefix=PREFIX, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("kwargs, message", [
    (dict(max_length=0), "max_length"),
    (dict(min_length=20), "min_length"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(do_sample=True, num_beams=4), "beam sampling"),
    (dict(decoder_prefix=[]), "decoder_prefix"),
    (dict(decoder_prefix=[1, -3]), "decoder_prefix"),
    (dict(eos_id=None), "eos_id"),
])
def test_config_rejects_bad_values(kwargs, message):
    base = dict(max_length=10, eos_id=2, pad_id=0, decoder_prefix=[1, 3])
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{**base, **kwargs})


def test_config_stores_prefix_as_tuple():
    assert GenerationConfig(4, eos_id=2, pad_id=0, decoder_prefix=[1, 3]).decoder_prefix == (1, 3)


# ---------------------------------------------------------------------------------------------------------------
# Greedy and sampling

def test_greedy_equals_uncached_reference(model, batch, eos):
    cfg = gen_config(eos)
    out = generate(model, *batch, cfg)
    ref = slow_greedy(model, *batch, cfg)
    assert out.tolist() == ref
    assert out.dtype == torch.long and out.size(0) == batch[0].size(0)


def test_greedy_stops_rows_and_loop_at_eos(model):
    for seed in range(20):  # a batch whose rows share a token, used as eos, at different steps
        batch = encoder_batch(seed)
        eos = pick_eos(model, *batch, max_length=20)
        rows = generate(model, *batch, gen_config(eos, max_length=20)).tolist()
        if all(eos in row for row in rows) and len({row.index(eos) for row in rows}) > 1:
            break
    cfg = gen_config(eos, max_length=20)
    decoder = CachedDecoder(model, batch[0], batch[1], batch[1])
    out = greedy_or_sample(decoder, cfg)
    stops = [row.index(eos) if eos in row else None for row in out.tolist()]
    assert all(s is not None for s in stops), f"precondition: every row should meet eos {eos}: {out.tolist()}"
    for row, s in zip(out.tolist(), stops):
        assert all(t == PAD for t in row[s + 1:])
    assert out.size(1) == max(stops) + 1 < cfg.max_length  # the loop ended when the last row stopped
    assert decoder.num_calls == out.size(1)  # one prefix call + one call per later step


def test_min_length_forbids_early_eos(model, batch, eos):
    cfg = gen_config(eos, min_length=6)
    out = generate(model, *batch, cfg)
    assert eos not in out[:, :6].flatten().tolist()
    assert out.tolist() == slow_greedy(model, *batch, cfg)


def test_no_repeat_ngram(model, batch, eos):
    plain = generate(model, *batch, gen_config(eos, max_length=16, min_length=16))
    for n in (1, 2, 3):
        cfg = gen_config(eos, max_length=16, min_length=16, no_repeat_ngram_size=n)
        out = generate(model, *batch, cfg)
        for row in out.tolist():
            seq = list(PREFIX) + row
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)), (n, seq)
        assert out.tolist() == slow_greedy(model, *batch, cfg)
    assert not torch.equal(plain, generate(model, *batch, gen_config(eos, max_length=16, min_length=16,
                                                                       no_repeat_ngram_size=2)))


def test_ban_repeated_ngrams_handles_duplicate_completions():
    # Token 7 completes the bigram (5, 7) (after 5: banned) and (6, 7) (not matching): one match must win.
    scores = torch.zeros(1, 10)
    ban_repeated_ngrams(scores, torch.tensor([[5, 7, 6, 7, 5]]), 2)
    assert scores[0, 7] == float("-inf") and torch.isfinite(scores[0, :7]).all()


def test_sampling_is_reproducible_and_top_k1_is_greedy(model, batch, eos):
    cfg = gen_config(eos, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    a = generate(model, *batch, cfg, generator=torch.Generator().manual_seed(5))
    b = generate(model, *batch, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    runs = {tuple(generate(model, *batch, cfg, generator=torch.Generator().manual_seed(s)).flatten().tolist())
            for s in range(4)}
    assert len(runs) > 1  # the seed matters
    greedy = generate(model, *batch, gen_config(eos))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)):
        out = generate(model, *batch, gen_config(eos, do_sample=True, **kw), generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, greedy), kw


def test_sample_tokens_respects_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    base = dict(max_length=1, eos_id=3, pad_id=0, decoder_prefix=[0], do_sample=True)
    drawn = sample_tokens(logits, GenerationConfig(**base, top_k=2), gen)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    drawn = sample_tokens(logits, GenerationConfig(**base, top_p=0.85), gen)  # 0.5 + 0.3 < 0.85: keep 3
    assert set(drawn.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------------------------
# Beam search

def test_beam_search_with_one_beam_equals_greedy(model, batch, eos):
    cfg = gen_config(eos, max_length=14)
    greedy = generate(model, *batch, cfg)
    beam = beam_search(CachedDecoder(model, batch[0], batch[1], batch[1]), cfg)
    assert trim(beam, eos) == trim(greedy, eos)


@pytest.mark.parametrize("kw", [dict(), dict(length_penalty=0.6, no_repeat_ngram_size=2, min_length=3)])
def test_beam_search_batched_equals_per_example_and_uncached(model, batch, eos, kw):
    cfg = gen_config(eos, max_length=10, num_beams=4, **kw)
    ids, mask = batch
    out = generate(model, ids, mask, cfg)
    for row in range(ids.size(0)):
        n = int(mask[row].sum())
        alone = generate(model, ids[row:row + 1, :n], mask[row:row + 1, :n], cfg)
        assert trim(alone, eos) == trim(out[row:row + 1], eos)
        assert trim(out[row:row + 1], eos)[0] == slow_beam(model, ids[row:row + 1], mask[row:row + 1], cfg)
    assert eos in out.flatten().tolist()  # precondition: some hypotheses finish before max_length


class EosFromStep(torch.nn.Module):
    """Test double: the wrapped model's logits, with eos made overwhelmingly likely from new token `step` on."""

    def __init__(self, model, eos: int, step: int):
        super().__init__()
        self.model, self.eos, self.step = model, eos, step

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        past = kwargs.get("past_key_values")
        new_tokens = 0 if past is None else past[0]["self_k"].size(2) - len(PREFIX) + 1
        if out["lm_logits"] is not None and new_tokens >= self.step:
            out["lm_logits"][..., self.eos] += 100.0
        return out


@pytest.mark.parametrize("beams", [1, 4])
def test_beam_search_ends_loop_when_every_example_is_done(model, batch, beams):
    decoder = CachedDecoder(EosFromStep(model, eos=7, step=5), batch[0], batch[1], batch[1])
    out = beam_search(decoder, gen_config(7, max_length=20, num_beams=beams))
    assert out[:, 5].tolist() == [7] * batch[0].size(0) and out.size(1) == 6
    assert decoder.num_calls == 6  # prefix call + 5 steps, not max_length


def test_beam_search_needs_twice_the_beams_in_vocab(model, batch):
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, *batch, gen_config(2, num_beams=VOCAB // 2 + 1))


def test_beam_search_pads_after_eos(model, batch, eos):
    out = generate(model, *batch, gen_config(eos, max_length=10, num_beams=4))
    for row in out.tolist():
        if eos in row:
            assert all(t == PAD for t in row[row.index(eos) + 1:])


# ---------------------------------------------------------------------------------------------------------------
# Cache use: the cross K/V projection runs once per generate call

@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=5)])
def test_cross_kv_projected_once(model, batch, eos, kw):
    calls = []
    hooks = [block.cross_attn.cross_attn.project_kv.register_forward_hook(lambda *a: calls.append(a[1][0].shape))
             for block in model.decoder.blocks]
    try:
        out = generate(model, *batch, gen_config(eos, **kw), generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert out.size(1) > 2
    assert len(calls) == len(model.decoder.blocks)  # one projection per layer, for B rows (not B*beams)
    assert all(shape[0] == batch[0].size(0) for shape in calls)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face T5 with the same weights

def to_hf_t5(model: EncDecModel, *, eos: int):
    pytest.importorskip("transformers")
    from hf_reference import load_into_hf, make_hf_model

    t5 = make_hf_model(model.config, pad_token_id=PAD, eos_token_id=eos, decoder_start_token_id=PREFIX[0])
    load_into_hf(t5, model.state_dict(), model.config)
    return t5.eval()


def hf_generate(t5, ids, mask, cfg: GenerationConfig) -> torch.Tensor:
    prefix = torch.tensor([cfg.decoder_prefix]).expand(ids.size(0), -1)
    out = t5.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix, max_new_tokens=cfg.max_length,
                      min_new_tokens=cfg.min_length or None, num_beams=cfg.num_beams, do_sample=False,
                      early_stopping=True, length_penalty=cfg.length_penalty,
                      no_repeat_ngram_size=cfg.no_repeat_ngram_size or None, eos_token_id=cfg.eos_id,
                      pad_token_id=cfg.pad_id)
    return out[:, len(cfg.decoder_prefix):]


@pytest.fixture(scope="module")
def t5(model, eos):
    return to_hf_t5(model, eos=eos)


def test_hf_model_matches_ours(model, t5, batch):
    ids, mask = batch
    dec = torch.tensor([list(PREFIX) + [7, 9, 11]] * ids.size(0))
    ours = model(enc_input_ids=ids, enc_attention_mask=mask, dec_input_ids=dec, cross_attention_mask=mask)
    theirs = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours["lm_logits"], theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(min_length=4, no_repeat_ngram_size=2)])
def test_greedy_equals_hf(model, t5, batch, eos, kw):
    cfg = gen_config(eos, max_length=16, **kw)
    assert trim(generate(model, *batch, cfg), eos) == trim(hf_generate(t5, *batch, cfg), eos)


@pytest.mark.parametrize("kw", [dict(), dict(length_penalty=0.5), dict(length_penalty=1.5, no_repeat_ngram_size=3)])
def test_beam_search_equals_hf(model, t5, batch, eos, kw):
    ids, mask = encoder_batch(seed=0, batch=5)
    eos = pick_eos(model, ids, mask, num_beams=4)
    cfg = gen_config(eos, max_length=12, num_beams=4, **kw)
    ours = trim(generate(model, ids, mask, cfg), eos)
    assert ours == trim(hf_generate(t5, ids, mask, cfg), eos)
    assert any(row[-1] == eos for row in ours)  # precondition: some finished before max_length


# ---------------------------------------------------------------------------------------------------------------
# Teacher-forced scoring

def test_score_candidates_restricted_argmax(model, batch):
    ids, mask = batch
    dec = torch.tensor([list(PREFIX)] * ids.size(0))
    full = model(enc_input_ids=ids, enc_attention_mask=mask, dec_input_ids=dec,
                 cross_attention_mask=mask)["lm_logits"][:, 1].float()
    candidates = torch.tensor([[10, 20, 30, -1], [5, 6, -1, -1], [int(full[2].argmax()), 40, 50, 60]])
    pred, scores = score_candidates(model, {"enc_input_ids": ids, "enc_attention_mask": mask, "dec_input_ids": dec,
                                            "cross_attention_mask": mask, "candidate_ids": candidates})
    expected = full.gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, float("-inf"))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert pred.tolist() == expected.argmax(-1).tolist()
    assert pred[2].item() == 0  # the whole-vocab argmax wins when it is a candidate
    # only candidates compete: the full-vocab argmax of row 0 is usually none of 10/20/30
    assert all(int(pred[r]) < int((candidates[r] >= 0).sum()) for r in range(3))


def test_score_token_logit(model, batch):
    ids, mask = batch
    dec = torch.tensor([list(PREFIX) + [9]] * ids.size(0))
    full = model(enc_input_ids=ids, enc_attention_mask=mask, dec_input_ids=dec,
                 cross_attention_mask=mask)["lm_logits"].float()
    got = score_token_logit(model, {"enc_input_ids": ids, "enc_attention_mask": mask, "dec_input_ids": dec,
                                    "cross_attention_mask": mask}, 17)
    torch.testing.assert_close(got, full[:, -1, 17])
    # with a 2-D decoder padding mask the last real position of each row is used
    dec_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    got = score_token_logit(model, {"enc_input_ids": ids, "enc_attention_mask": mask, "dec_input_ids": dec,
                                    "dec_attention_mask": dec_mask, "cross_attention_mask": mask}, 17)
    assert torch.allclose(got[1], full[1, 1, 17], atol=1e-5) and torch.allclose(got[0], full[0, 2, 17], atol=1e-5)


def test_generate_rejects_4d_mask_without_cross_mask(model, batch):
    ids, mask = batch
    mask4 = mask[:, None, None, :].expand(-1, 1, ids.size(1), -1)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        generate(model, ids, mask4, gen_config(2))
    out = generate(model, ids, mask4, gen_config(2), cross_attention_mask=mask)
    assert torch.equal(out, generate(model, ids, mask, gen_config(2)))
