"""tools/build_vocab.py writes a loadable CPM-2-layout vocab that covers every character of its corpus."""
import pytest

from tokenization import rules
from tokenization_enc_dec import load_tokenizer
from tools import build_vocab

CORPUS = ["今天天气很好，我们去公园玩吧！\n", "明天天气也很好，我们去图书馆看书。\n", "ＣＰＭ-2 是一个中文模型 2021\n",
          "今天我们去公园。\n", "𠮷野家的饭很好吃\n"] * 3


def _write_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(CORPUS), encoding="utf-8")
    return path


def test_layout_and_round_trip(tmp_path):
    out = tmp_path / "vocab" / "vocab.txt"
    assert build_vocab.main(["--corpus", str(_write_corpus(tmp_path)), "--out", str(out), "--num-sentinels", "10"]) == 0
    tok = load_tokenizer(out.parent)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[:11] == ["<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>", "▁", ",", "▂"]
    assert lines[-10:] == [f"<s_{i}>" for i in range(10)]
    assert (tok.pad_id, tok.decoder_start_id, tok.eod_id, tok.mask_id) == (5, 1, 7, 6)
    assert tok.get_sentinel_num() == 10 and tok.get_sentinel_id(0) == len(lines) - 10
    assert "天气" in tok.vocab and "公园" in tok.vocab  # frequent jieba pieces
    for line in CORPUS:  # every character is in the vocab: no <unk>, and decode inverts encode
        ids = tok.encode(line)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == rules.fold_full_width(line)


def test_deterministic_and_size(tmp_path):
    corpus = _write_corpus(tmp_path)
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    build_vocab.main(["--corpus", str(corpus), "--out", str(a)])
    build_vocab.main(["--corpus", str(corpus), "--out", str(b)])
    assert a.read_bytes() == b.read_bytes()
    n_chars = len(set(rules.fold_full_width("".join(CORPUS))) - {" ", "\n"})
    size = 11 + 190 + n_chars + 2
    build_vocab.main(["--corpus", str(corpus), "--out", str(c), "--size", str(size)])
    assert len(c.read_text(encoding="utf-8").splitlines()) == size


def test_size_too_small_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_vocab.main(["--corpus", str(_write_corpus(tmp_path)), "--out", str(tmp_path / "v.txt"), "--size", "50"])
    assert "too small" in capsys.readouterr().err
