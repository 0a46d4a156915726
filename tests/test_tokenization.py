"""EncDecTokenizer against the original's outputs (golden file) and the rules of SPEC §5, for both vocabs."""
import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenization_enc_dec as tok_mod
from tokenization import parallel, rules, segment
from tokenization_enc_dec import EncDecTokenizer, load_tokenizer

_CACHE = {}


def _tok(path) -> EncDecTokenizer:
    # Loading a vocab takes ~0.1 s; share one instance per file across tests.
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = EncDecTokenizer(path)
    return _CACHE[key]


@pytest.fixture
def cn(cn_vocab):
    return _tok(cn_vocab)


@pytest.fixture
def en(cn_en_vocab):
    return _tok(cn_en_vocab)


def ids_of(tokenizer, tokens):
    return [tokenizer.token_to_id(t) for t in tokens]


# ----------------------------------------------------------------------------------------------- golden
def test_golden_file_both_vocabs(shared_data, cn, en):
    by_vocab = {"bpe_cn": cn, "bpe_cn_en": en}
    rows = [json.loads(line) for line in (shared_data / "tokenizer_golden_public.jsonl").open(encoding="utf-8")]
    assert {r["vocab"] for r in rows} == set(by_vocab)
    for row in rows:
        tokenizer = by_vocab[row["vocab"]]
        assert tokenizer.encode(row["text"]) == row["ids"], row
        assert tokenizer.decode(row["ids"]) == row["decoded"], row


# ----------------------------------------------------------------------------------------------- known ids
def test_known_ids_chinese_vocab(cn):
    assert cn.encode("今天天气很好，我们去公园玩吧！") == [739, 3775, 52, 68, 16, 103, 93, 2627, 286, 134, 13]
    assert cn.encode("第一行\n第二行") == [181, 224, 3, 287, 224]
    assert cn.token_to_id("相似") == 2946 and cn.encode("相似") == [2946]
    assert cn.token_to_id("矛盾") == 2590 and cn.encode("矛盾") == [2590]
    assert cn.token_to_id("<s_0>") == 26050 == cn.get_sentinel_id(0)
    assert cn.token_to_id("<pad>") == 5 == cn.pad_id
    assert cn.encode("Hello world 2021") == [21992, 10, 12950, 10, 9656, 59]


def test_roles_and_sizes(cn, en):
    assert (cn.vocab_size, cn.unk_id, cn.decoder_start_id, cn.pad_id, cn.mask_id, cn.eod_id) == (26240, 0, 1, 5, 6, 7)
    assert (cn.get_sentinel_num(), cn.get_sentinel_id(189)) == (190, 26239)
    assert not cn.is_wordpiece and en.is_wordpiece
    # <go> at 7 shifts every later id by one.
    assert (en.vocab_size, en.unk_id, en.decoder_start_id, en.pad_id, en.mask_id, en.eod_id) == (51968, 0, 1, 5, 6, 8)
    assert (en.get_sentinel_num(), en.get_sentinel_id(0), en.get_sentinel_id(184)) == (185, 51783, 51967)
    with pytest.raises(IndexError):
        cn.get_sentinel_id(190)
    assert len(cn.fingerprint) == 16 and cn.fingerprint != en.fingerprint


def test_token_to_id_names_missing_token(cn):
    with pytest.raises(KeyError, match="no-such-token"):
        cn.token_to_id("no-such-token")


def test_convert_tokens_and_ids(cn, en):
    for t in (cn, en):
        assert t.convert_tokens_to_ids(["<pad>", "相似", "no-such-token"]) == [5, t.token_to_id("相似"), 0]
        assert t.convert_ids_to_tokens([0, t.get_sentinel_id(1)]) == ["<unk>", "<s_1>"]
    with pytest.raises(ValueError, match="outside the vocab"):
        cn.decode([26240])


# ----------------------------------------------------------------------------------------------- Chinese rules
def test_full_width_folding_kept_punctuation(cn):
    assert cn.tokenize("ＡＢＣ１２３（测试）") == ["<unk>"] * 6 + ["（", "测试", "）"]  # tokenize does not fold
    assert cn.encode("ＡＢＣ１２３（测试）") == ids_of(cn, ["ABC", "123", "（", "测试", "）"])
    # U+3000 becomes a space; ，。！（）？、；： stay full width.
    assert cn.encode("ＨＥＬＬＯ\u3000ｗｏｒｌｄ") == cn.encode("HELLO world")
    kept = "，。！（）？、；："
    assert cn.decode(cn.encode(kept)) == kept
    assert rules.fold_full_width("Ａ\u3000，；～") == "A ，；~"


def test_newlines_and_space_runs(cn):
    assert cn.tokenize("a  b\n\nc") == ["a", "▂", "▂", "b", "▃", "▃", "c"]
    assert cn.decode(cn.encode("a  b\n\nc")) == "a  b\n\nc"


def test_characters_outside_the_vocab(cn, en):
    for t in (cn, en):
        assert t.encode("𠮷野家") == [t.unk_id] + ids_of(t, ["野", "家"])
        assert t.encode("🎉") == [t.unk_id]
    assert cn.decode(cn.encode("𠮷")) == "<unk>"


def test_long_piece_is_one_unk(cn, en):
    run = "a" * 205
    assert segment.cut_text(run) == [run]  # jieba keeps an ASCII run as one piece
    for t in (cn, en):
        assert t.encode(run) == [t.unk_id]
        assert t.unk_id not in t.encode("a" * 200)  # 200 characters is still matched


def test_empty_and_all_space(cn, en):
    for t in (cn, en):
        assert t.encode("") == [] and t.decode([]) == ""
        space = t.token_to_id("▂")
        assert t.encode("   ") == [space] * 3
        assert t.decode(t.encode("   ")) == "   "


def test_mixed_chinese_english_digits(cn, en):
    text = "我有3个iPhone和2台Mac"
    for t in (cn, en):
        assert t.tokenize(text) == ["我", "有", "3", "个", "iPhone", "和", "2", "台", "Mac"]
    assert cn.decode(cn.encode(text)) == text


def test_decode_inverts_encode_for_in_vocab_text(cn):
    for text in ["今天天气很好，我们去公园玩吧！", "ＡＢＣ　１２３（测试）\n下一行", "Python 3.11 和 PyTorch", "  两个空格  "]:
        assert cn.decode(cn.encode(text)) == rules.fold_full_width(text)


# ----------------------------------------------------------------------------------------------- Chinese-English
def test_cn_en_wordpiece_and_spaces(en):
    assert en.tokenize("CPM-2") == ["CP", "##M", "-", "2"]
    assert en.decode(en.encode("CPM-2")) == "CPM - 2"
    assert en.decode(en.encode("processing.")) == "processing ."
    space = en.token_to_id("▂")
    assert en.encode("a b") == ids_of(en, ["a", "b"])  # space between two English tokens dropped
    assert en.encode("a  b").count(space) == 2  # neighbours of each space include a space: kept
    assert en.decode(en.encode("a b")) == "a b"  # the decode inserts it back
    assert en.encode("中 文") == ids_of(en, ["中", "▂", "文"])


def test_cn_en_no_folding_and_single_token_once(en):
    assert en.encode("ＡＢ\u3000１") == [en.unk_id] * 4
    assert en.encode("相似") == [2947] and en.encode("a") == [en.token_to_id("a")]


def test_cn_en_first_and_last_space_kept(en):
    space = en.token_to_id("▂")
    ids = en.encode(" a b ")
    assert ids[0] == space and ids[-1] == space


# ----------------------------------------------------------------------------------------------- robustness
# The fixtures only hand out shared, read-only tokenizers, so reusing them across examples is safe.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_encode_never_raises(cn, en, text):
    for tokenizer in (cn, en):
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        tokenizer.decode(ids)


def test_encode_rejects_non_str(cn):
    with pytest.raises(TypeError, match="str"):
        cn.encode(b"bytes")


def test_caches_do_not_change_results(cn):
    text = "问题：他们在谈论什么？文章：男：听说你们公司要派你去南方工作?"
    first = cn.encode(text)
    first.append(-1)  # the caller may mutate the returned list
    assert cn.encode(text) == first[:-1]
    cn.clear_caches()
    assert cn.encode(text) == first[:-1]


def test_encode_batch_in_process_and_parallel(cn, en, monkeypatch):
    texts = ["今天天气很好", "a b", "", "第一行\n第二行"] * 10
    for t in (cn, en):
        expected = [t.encode(x) for x in texts]
        assert t.encode_batch(texts) == expected
        monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 0)  # force the process pool on a small input
        assert t.encode_batch(texts, num_workers=2) == expected
        monkeypatch.setattr(parallel, "MIN_PARALLEL_CHARS", 200_000)
    with pytest.raises(ValueError, match="num_workers"):
        cn.encode_batch(texts, num_workers=-1)


def test_pickle_rebuilds(cn):
    clone = pickle.loads(pickle.dumps(cn))
    assert clone.encode("今天天气很好") == cn.encode("今天天气很好") and clone.fingerprint == cn.fingerprint


# ----------------------------------------------------------------------------------------------- load_tokenizer
def test_load_tokenizer_paths(cn_vocab, tmp_path):
    assert isinstance(load_tokenizer(cn_vocab), EncDecTokenizer)
    assert load_tokenizer(cn_vocab.parent).vocab_size == 26240  # folder with vocab.txt
    assert load_tokenizer(str(cn_vocab)).pad_id == 5
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="neither vocab.txt"):
        load_tokenizer(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin"):
        load_tokenizer(other)


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tok_mod.EncDecTokenizer(bad)
