"""SentencePieceTokenizer roles and load_tokenizer dispatch, with a tiny SP model trained in the test."""
import io

import pytest
import sentencepiece

from tokenization_enc_dec import SentencePieceTokenizer, load_tokenizer

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world", "tokenizers turn text into ids",
             "a small model for a fast test", "sentinels mark the spans to fill"] * 20


def _train(path, user_symbols):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=80, user_defined_symbols=user_symbols,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("sp") / "spiece.model", [f"<extra_id_{i}>" for i in range(3)])


@pytest.fixture(scope="module")
def sp_model_plain(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("sp_plain") / "spiece.model", [])


def test_roles_with_sentinels_in_model(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eod_id, tok.unk_id, tok.decoder_start_id, tok.mask_id) == (0, 1, 2, 0, None)
    assert tok.get_sentinel_num() == 3
    assert [tok.get_sentinel_id(i) for i in range(3)] == [tok.token_to_id(f"<extra_id_{i}>") for i in range(3)]
    assert tok.vocab_size == tok.sp.get_piece_size()
    ids = tok.encode("hello world<extra_id_0>")
    assert ids[-1] == tok.get_sentinel_id(0) and tok.eod_id not in ids  # no EOS appended
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(KeyError, match="not-a-piece"):
        tok.token_to_id("not-a-piece")
    assert tok.convert_tokens_to_ids(["not-a-piece"]) == [tok.unk_id]
    assert len(tok.fingerprint) == 16
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]


def test_hf_layout_appends_sentinels(sp_model_plain):
    # HF T5's spiece.model has no <extra_id_i>; HF appends 100 of them, <extra_id_0> last.
    tok = SentencePieceTokenizer(sp_model_plain)
    size = tok.sp.get_piece_size()
    assert tok.vocab_size == size + 100
    assert tok.get_sentinel_id(0) == size + 99 and tok.get_sentinel_id(99) == size
    assert tok.token_to_id("<extra_id_0>") == size + 99
    ids = tok.encode("hello<extra_id_1> world")
    assert tok.get_sentinel_id(1) in ids
    # SentencePiece drops the word-initial "▁" of the run after the sentinel, as at the start of any text.
    assert tok.decode(ids) == "hello<extra_id_1>world"
    assert tok.convert_ids_to_tokens([size + 99]) == ["<extra_id_0>"]


def test_folder_with_spiece_model(sp_model):
    assert isinstance(load_tokenizer(sp_model.parent), SentencePieceTokenizer)
