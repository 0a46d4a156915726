"""Task registry, readers (both layouts of every task, on small hand-made files), bad-line errors, templates.

Most tests use a tiny character-level stand-in tokenizer so that they run without the real vocab; the tests
marked with the ``cn_vocab`` fixture check the exact ids of the original layout against the real CPM-2 vocab.
"""
from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from data_utils.errors import DataError
from data_utils.tasks import get_task, register, task_names
from data_utils.tasks.base import NUMERALS, DecodingDefaults, Task

# --------------------------------------------------------------------------------------------------------------
# A stand-in tokenizer: longest match over a small vocab, one id per known character, <unk> otherwise.
# --------------------------------------------------------------------------------------------------------------

_SPECIALS = ["<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>"]
_WORDS = ["意思", "矛盾", "相似", "相关", "问题", "选项", "文章", "查询", "标题"]
_CHARS = ("“”与的；，：、。？?！" + "".join(NUMERALS) + "问题选项文章查标询甲乙丙丁天气好坏我你他她们去来是不了吗男女红蓝"
          "裤裙型宽松短长衣上下春秋风格简约写广告标签诗句月光山水花鸟猫狗吃饭喝茶今明日年新闻摘要正文"
          "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-*/().%=x ")


class FakeTokenizer:
    def __init__(self, drop: tuple[str, ...] = ()) -> None:
        tokens = _SPECIALS + [t for t in dict.fromkeys(_WORDS + list(_CHARS)) if t not in drop]
        tokens += [f"<s_{i}>" for i in range(4)]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.vocab_size = len(tokens)
        self.pad_id = self.vocab["<pad>"]
        self.decoder_start_id = self.vocab["<s>"]

    def token_to_id(self, token: str) -> int:
        if token not in self.vocab:
            raise KeyError(token)
        return self.vocab[token]

    def get_sentinel_id(self, i: int) -> int:
        return self.vocab[f"<s_{i}>"]

    def encode(self, text: str) -> list[int]:
        ids, pos = [], 0
        while pos < len(text):
            for size in (2, 1):
                piece = text[pos:pos + size]
                if len(piece) == size and piece in self.vocab and (size == 1 or piece in _WORDS):
                    ids.append(self.vocab[piece])
                    pos += size
                    break
            else:
                ids.append(0)
                pos += 1
        return ids


@pytest.fixture
def tok() -> FakeTokenizer:
    return FakeTokenizer()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

EXPECTED = {
    "lcqmc": ("classify", ".jsonl", "accuracy"),
    "ccpm": ("classify", ".jsonl", "accuracy"),
    "c3": ("classify", ".json", "accuracy"),
    "math": ("generate", ".json", "value_accuracy"),
    "lcsts": ("generate", ".jsonl", "rouge-l"),
    "adgen": ("generate", ".json", "bleu-4"),
    "wmtencn": ("generate", ".json", "bleu"),
    "sogou-log": ("rank", ".json", "pairwise_accuracy"),
}


def test_registry_names_kinds_and_attributes():
    assert task_names() == sorted(EXPECTED)
    for name, (kind, ext, metric) in EXPECTED.items():
        task = get_task(name)
        assert (task.name, task.kind, task.default_ext, task.main_metric) == (name, kind, ext, metric)
        assert isinstance(task.decoding, DecodingDefaults) and task.decoding.out_seq_length == 256


def test_registry_aliases_and_unknown_name():
    assert get_task("math23k") is get_task("math")
    assert get_task("wmt20") is get_task("wmtencn")
    assert get_task("sogou_log") is get_task("sogou-log")
    with pytest.raises(ValueError, match="valid names: adgen, c3, ccpm, lcqmc, lcsts, math, sogou-log, wmtencn"):
        get_task("kdconv")


def test_register_twice_raises():
    class Again(Task):
        name, kind = "lcqmc", "classify"

    class AliasClash(Task):
        name, kind, aliases = "brand-new", "generate", ("math23k",)

    with pytest.raises(ValueError, match="already registered"):
        register(Again())
    with pytest.raises(ValueError, match="'math23k' is already registered"):
        register(AliasClash())
    assert "brand-new" not in task_names()


def test_decoding_defaults_are_the_originals():
    assert get_task("math").decoding == DecodingDefaults()  # greedy
    assert get_task("lcsts").decoding == DecodingDefaults()
    adgen = get_task("adgen").decoding
    assert (adgen.do_sample, adgen.top_k, adgen.top_p, adgen.temperature) == (True, 40, 0.9, 1.0)
    assert get_task("wmtencn").decoding.num_beams == 4


# --------------------------------------------------------------------------------------------------------------
# Split-file resolution
# --------------------------------------------------------------------------------------------------------------


def test_split_file_resolution(tmp_path):
    ccpm = get_task("ccpm")
    row = {"translation": "月光", "choices": ["山水", "花鸟", "猫狗", "吃饭"], "answer": 1}
    jsonl(tmp_path / "valid.jsonl", [row])
    jsonl(tmp_path / "test_public.jsonl", [{k: v for k, v in row.items() if k != "answer"}])
    assert ccpm.split_files(tmp_path, "dev") == [tmp_path / "valid.jsonl"]
    assert ccpm.split_files(tmp_path, "test") == [tmp_path / "test_public.jsonl"]
    assert ccpm.read_split(tmp_path, "test")[0]["label"] is None  # public test: unlabelled
    jsonl(tmp_path / "dev.jsonl", [row])
    assert ccpm.split_files(tmp_path, "dev") == [tmp_path / "dev.jsonl"]  # DATA_PATH/{split}{ext} first
    # --data-path may name the file itself
    assert ccpm.split_files(tmp_path / "valid.jsonl", "train") == [tmp_path / "valid.jsonl"]
    with pytest.raises(DataError, match=r"no train file for task 'ccpm'; looked for train\.jsonl"):
        ccpm.split_files(tmp_path, "train")
    with pytest.raises(DataError, match="does not exist"):
        ccpm.split_files(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="unknown split"):
        ccpm.split_files(tmp_path, "validation")


def test_ext_without_dot_and_alternative_ext(tmp_path):
    write(tmp_path / "train.tsv", "甲\t乙\t1\n")
    lcqmc = get_task("lcqmc")
    assert lcqmc.split_files(tmp_path, "train") == [tmp_path / "train.tsv"]
    assert lcqmc.split_files(tmp_path, "train", "tsv") == [tmp_path / "train.tsv"]


# --------------------------------------------------------------------------------------------------------------
# Readers, both layouts, and templates (stand-in tokenizer)
# --------------------------------------------------------------------------------------------------------------


def test_lcqmc_both_layouts(tmp_path, tok):
    lcqmc = get_task("lcqmc")
    a = lcqmc.read_split(jsonl(tmp_path / "a.jsonl", [{"sentence1": "天气好", "sentence2": "天气坏", "label": 0},
                                                       {"sentence1": "我去", "sentence2": "你去", "label": 1,
                                                        "id": 7}]), "train")
    b = lcqmc.read_split(write(tmp_path / "b.tsv", "text_a\ttext_b\tlabel\n天气好\t天气坏\t0\n我去\t你去\t1\n"), "train")
    c = lcqmc.read_split(write(tmp_path / "c.tsv", "天气好\t天气坏\t0\r\n\n我去\t你去\t1\n"), "train")
    d = lcqmc.read_split(write(tmp_path / "d.tsv", "query\ttitle\tlabel\n天气好\t天气坏\t0\n"), "train")
    for examples in (a, b, c):
        assert [(e["sentence1"], e["sentence2"], e["label"]) for e in examples] == [("天气好", "天气坏", 0),
                                                                                    ("我去", "你去", 1)]
    assert [e["id"] for e in a] == [0, 7] and [e["id"] for e in c] == [0, 1]
    assert d[0]["sentence2"] == "天气坏"
    unlabelled = lcqmc.read_split(write(tmp_path / "e.tsv", "天气好\t天气坏\n"), "test")
    assert unlabelled[0]["label"] is None

    out = lcqmc.encode(a[1], tok)
    v = tok.vocab
    assert out["enc_ids"] == ([v["“"]] + tok.encode("我去") + [v["”"], v["与"], v["“"]] + tok.encode("你去")
                              + [v["”"], v["的"], v["意思"], tok.get_sentinel_id(0)])
    assert out["candidate_ids"] == [v["矛盾"], v["相似"]]
    assert (out["answer_ids"], out["label_index"], out["reference"], out["id"]) == ([v["相似"]], 1, "相似", 7)
    assert out["input_text"] == "“我去”与“你去”的意思"
    blank = lcqmc.encode(unlabelled[0], tok)
    assert (blank["answer_ids"], blank["label_index"], blank["reference"]) == ([], -1, None)


def test_ccpm_template_and_answer(tmp_path, tok):
    ccpm = get_task("ccpm")
    path = jsonl(tmp_path / "dev.jsonl", [{"translation": "月光", "choices": ["山水", "花鸟", "猫狗", "吃饭"],
                                           "answer": 2}])
    raw = ccpm.read_split(path, "dev")[0]
    out = ccpm.encode(raw, tok)
    v = tok.vocab
    options = []
    for numeral, choice in zip("一二三四", ["山水", "花鸟", "猫狗", "吃饭"]):
        options += [v[numeral], v["、"]] + tok.encode(choice) + [v["；"]]
    assert out["enc_ids"] == tok.encode("选项：") + options + tok.encode("文章：") + tok.encode("月光")
    assert out["candidate_ids"] == [v[n] for n in "一二三四"]
    assert (out["answer_ids"], out["label_index"], out["reference"]) == ([v["三"]], 2, "三")


def c3_doc(lines, questions, doc_id="1-1"):
    return [lines, questions, doc_id]


def test_c3_reads_all_context_lines_and_both_public_files(tmp_path, tok):
    c3 = get_task("c3")
    q = {"question": "他去吗?", "choice": ["去", "不去"], "answer": "不去"}
    write(tmp_path / "c3-d-dev.json", json.dumps([c3_doc(["男：你去吗?", "女：不去。"], [q, dict(q, answer="去")])],
                                                 ensure_ascii=False, indent=1))
    write(tmp_path / "c3-m-dev.json", json.dumps([c3_doc(["今天天气好。"], [q], "m1-1")], ensure_ascii=False))
    examples = c3.read_split(tmp_path, "dev")
    assert [e["id"] for e in examples] == ["1-1-0", "1-1-1", "m1-1-0"]
    assert examples[0]["context"] == "男：你去吗?\n女：不去。"  # every line, not only the first
    assert [e["label"] for e in examples] == [1, 0, 1]
    out = c3.encode(examples[0], tok)
    v = tok.vocab
    options = [v["一"], v["、"]] + tok.encode("去") + [v["；"], v["二"], v["、"]] + tok.encode("不去") + [v["；"]]
    assert out["enc_ids"] == (tok.encode("问题：") + tok.encode("他去吗?") + tok.encode("选项：") + options
                              + tok.encode("文章：") + tok.encode("男：你去吗?\n女：不去。"))
    assert out["candidate_ids"] == [v["一"], v["二"]] and out["answer_ids"] == [v["二"]]


def test_c3_eight_options_and_truncation(tmp_path, tok):
    c3 = get_task("c3")
    choices = ["甲", "乙", "丙", "丁", "红", "蓝", "猫", "狗"]
    path = write(tmp_path / "dev.json", json.dumps([c3_doc(["天气好。" * 400], [
        {"question": "选哪个?", "choice": choices, "answer": "狗"}])], ensure_ascii=False))
    raw = c3.read_split(path, "dev")[0]
    out = c3.encode(raw, tok)
    assert out["candidate_ids"] == [tok.vocab[n] for n in "一二三四五六七八"]
    assert out["answer_ids"] == [tok.vocab["八"]] and out["reference"] == "八"
    assert len(out["enc_ids"]) == 768  # the original's cut
    assert len(c3.encode(raw, tok, max_enc_len=100)["enc_ids"]) == 100


def test_math_layouts(tmp_path, tok):
    math = get_task("math")
    cpm2 = write(tmp_path / "cpm2.json", json.dumps([{"text": "甲有3个", "equation": "x=3+2"}], ensure_ascii=False))
    public = write(tmp_path / "public.json", json.dumps([{"original_text": "甲有3个", "text": "甲 有 temp_a 个",
                                                          "equation": "x=3+2", "ans": "5", "id": "35"}],
                                                        ensure_ascii=False))
    # Math_23K.json: concatenated, pretty-printed objects (7 lines each), not a list
    stream = write(tmp_path / "Math_23K.json", "".join(
        json.dumps({"id": str(i), "original_text": "甲有3个", "segmented_text": "甲 有 3 个", "equation": "x=3+2",
                    "ans": "5"}, ensure_ascii=False, indent=4) + "\n" for i in range(2)))
    for path in (cpm2, public, stream):
        examples = math.read_split(path, "train")
        assert examples[0]["text"] == "甲有3个" and examples[0]["target"] == "3+2"
        assert examples[0]["equation"] == "x=3+2"
    assert math.read_split(public, "train")[0]["ans"] == "5" and math.read_split(public, "train")[0]["id"] == "35"
    assert len(math.read_split(stream, "train")) == 2
    out = math.encode(math.read_split(public, "train")[0], tok)
    assert out["enc_ids"] == tok.encode("甲有3个")
    assert out["answer_ids"] == tok.encode("3+2") + [tok.get_sentinel_id(1)]
    assert out["reference"] == "3+2" and out["candidate_ids"] == []


def test_lcsts_layouts_and_human_label_filter(tmp_path, tok, caplog):
    lcsts = get_task("lcsts")
    cpm2 = jsonl(tmp_path / "train.jsonl", [{"text": "今天新闻正文", "summary": "新闻摘要"}])
    part = write(tmp_path / "PART_III.txt", (
        "<doc id=0>\n    <human_label>5</human_label>\n    <summary>\n        新闻摘要\n    </summary>\n"
        "    <short_text>\n        今天新闻正文\n    </short_text>\n</doc>\n"
        "<doc id=1>\n    <human_label>2</human_label>\n    <summary>\n        坏\n    </summary>\n"
        "    <short_text>\n        坏\n    </short_text>\n</doc>\n"))
    write(tmp_path / "PART_I.txt", "<doc id=0>\n<summary>\n新闻摘要\n</summary>\n<short_text>\n今天新闻正文\n"
                                   "</short_text>\n</doc>\n")
    with caplog.at_level(logging.INFO):
        from_part = lcsts.read_split(part, "test")
    assert "left out 1 document(s) with human_label < 3" in caplog.text
    assert [(e["text"], e["summary"], e["id"]) for e in from_part] == [("今天新闻正文", "新闻摘要", "0")]
    assert lcsts.read_split(cpm2, "train")[0]["summary"] == "新闻摘要"
    (tmp_path / "train.jsonl").unlink()
    assert lcsts.split_files(tmp_path, "train") == [tmp_path / "PART_I.txt"]
    assert lcsts.split_files(tmp_path, "test") == [tmp_path / "PART_III.txt"]
    out = lcsts.encode(from_part[0], tok)
    assert out["answer_ids"] == tok.encode("新闻摘要") + [tok.get_sentinel_id(1)]


def test_adgen_layouts_give_the_same_template(tmp_path, tok):
    adgen = get_task("adgen")
    cpm2 = jsonl(tmp_path / "cpm2.json", [
        {"title": "", "feature": [["类型", "裤"], ["版型", "宽松"]], "desc": "写广告"},
        {"title": "春", "tags": ["简约", "长"], "feature": [["类型", "裙"]], "desc": "写广告"}])
    public = jsonl(tmp_path / "public.json", [{"content": "类型#裤*版型#宽松", "summary": "写广告"}])
    a, b = adgen.read_split(cpm2, "train"), adgen.read_split(public, "train")
    v = tok.vocab
    expected = tok.encode("类型") + [v["："]] + tok.encode("裤") + [v["，"]] + tok.encode("版型") + [v["："]] \
        + tok.encode("宽松") + [v["；"]]
    assert adgen.encode(a[0], tok)["enc_ids"] == expected == adgen.encode(b[0], tok)["enc_ids"]
    second = adgen.encode(a[1], tok)
    assert second["enc_ids"] == (tok.encode("春") + [v["；"]] + tok.encode("简约") + [v["，"]] + tok.encode("长")
                                 + [v["；"]] + tok.encode("类型") + [v["："]] + tok.encode("裙") + [v["；"]])
    assert second["input_text"] == "春；简约，长；类型：裙；"
    assert second["answer_ids"] == tok.encode("写广告") + [tok.get_sentinel_id(1)]


def test_wmt_layouts(tmp_path, tok):
    wmt = get_task("wmtencn")
    cpm2 = write(tmp_path / "train.json", json.dumps([{"source": "新闻", "target": "news", "index": 4}]))
    examples = wmt.read_split(cpm2, "train")
    # the original's field use: the encoder reads "target", the decoder learns "source"
    assert examples == [{"id": 4, "source_text": "news", "target_text": "新闻"}]
    write(tmp_path / "dev.en", "good news\nhello\n")
    write(tmp_path / "dev.zh", "好新闻\n你好\n")
    pairs = wmt.read_split(tmp_path, "dev")
    assert [(e["source_text"], e["target_text"]) for e in pairs] == [("good news", "好新闻"), ("hello", "你好")]
    assert wmt.read_split(tmp_path / "dev.zh", "dev") == pairs  # either file of the pair
    out = wmt.encode(pairs[0], tok)
    assert out["enc_ids"] == tok.encode("good news")
    assert out["answer_ids"] == tok.encode("好新闻") + [tok.get_sentinel_id(1)]
    write(tmp_path / "infer.en", "hello\n\n")
    assert wmt.read_split(tmp_path, "infer") == [{"id": 0, "source_text": "hello", "target_text": None}]
    write(tmp_path / "test.en", "a\nb\n")
    write(tmp_path / "test.zh", "a\n")
    with pytest.raises(DataError, match="2 source lines but 1 lines in test.zh"):
        wmt.read_split(tmp_path, "test")


def test_sogou_layouts(tmp_path, tok, caplog):
    sogou = get_task("sogou-log")
    train = jsonl(tmp_path / "train.json", [
        {"query": "天气", "pos_doc": "今天天气好", "neg_doc": "猫狗"},
        {"query": "锟斤拷", "pos_doc": "a", "neg_doc": "b"},
        {"query": "天气", "pos_doc": "同", "neg_doc": "同"}])
    with caplog.at_level(logging.WARNING):
        pairs = sogou.read_split(train, "train")
    assert len(pairs) == 1 and "left out 2 pair(s)" in caplog.text
    out = sogou.encode(pairs[0], tok)
    head = tok.encode("查询：") + tok.encode("天气") + tok.encode("标题：")
    assert out["group_enc_ids"] == [head + tok.encode("今天天气好"), head + tok.encode("猫狗")]
    assert "enc_ids" not in out
    assert out["label_index"] == 0 and out["answer_ids"] == out["candidate_ids"] == [tok.vocab["相关"]]
    test = jsonl(tmp_path / "test.json", [{"query_id": "q9", "query": "天气", "doc": [
        {"sogou_id": "d-1", "title": "天气好", "label": 2}, {"sogou_id": "d-2", "title": "猫", "label": 0}]}])
    listed = sogou.read_split(test, "test")[0]
    assert (listed["id"], listed["doc_ids"], listed["relevance"]) == ("q9", ["d-1", "d-2"], [2.0, 0.0])
    assert sogou.encode(listed, tok, max_enc_len=len(head) + 1)["group_enc_ids"][0] == head + tok.encode("天")
    with pytest.raises(ValueError, match="no prompt layout"):
        sogou.encode(listed, tok, prompt={"enc": {"prompt_len": 10}})


# --------------------------------------------------------------------------------------------------------------
# Bad lines: file:line: field: what, and --skip-bad-lines counting
# --------------------------------------------------------------------------------------------------------------

GOOD = '{"sentence1": "甲", "sentence2": "乙", "label": 1}'


@pytest.mark.parametrize("bad_line, field, reason", [
    ('{"sentence1": "甲", "sentence2": "乙", "lab', None, "invalid JSON"),  # truncated
    ('{"sentence1": 3, "sentence2": "乙", "label": 1}', "sentence1", "must be a string"),
    ('{"sentence1": "甲", "label": 1}', "sentence2", "missing field"),
    ('{"sentence1": "甲", "sentence2": "乙", "label": 2}', "label", r"must be one of \[0, 1\], got 2"),
    ('["甲", "乙", 1]', None, "expected a JSON object"),
])
def test_bad_line_errors_name_file_line_field(tmp_path, bad_line, field, reason):
    path = write(tmp_path / "train.jsonl", f"{GOOD}\n{GOOD}\n{bad_line}\n{GOOD}\n")
    lcqmc = get_task("lcqmc")
    with pytest.raises(DataError, match=reason) as info:
        lcqmc.read_split(path, "train")
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: " + (f"field {field!r}: " if field else ""))
    result = lcqmc.read_split_result(path, "train", skip_bad_lines=True)
    assert len(result.examples) == 3 and len(result.skipped) == 1 and result.skipped[0].line == 3


def test_skip_bad_lines_counts_and_logs(tmp_path, caplog):
    path = write(tmp_path / "train.jsonl", "\n".join([GOOD, "{oops", GOOD, '{"sentence1": "甲"}', "", GOOD]) + "\n")
    with caplog.at_level(logging.WARNING):
        result = get_task("lcqmc").read_split_result(path, "train", skip_bad_lines=True)
    assert len(result.examples) == 3
    assert [e.line for e in result.skipped] == [2, 4]
    assert "skipped 2 bad line(s)" in caplog.text


def test_non_utf8_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"sentence1": "甲", "sentence2": "乙", "label": 1}'.encode("gbk")
                     + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8 \(byte 0x"):
        get_task("lcqmc").read_split(path, "train")
    result = get_task("lcqmc").read_split_result(path, "train", skip_bad_lines=True)
    assert len(result.examples) == 2 and result.skipped[0].line == 2


def test_empty_file_is_an_error_even_when_skipping(tmp_path):
    path = write(tmp_path / "dev.jsonl", "\n  \n")
    with pytest.raises(DataError, match="dev.jsonl: the file is empty"):
        get_task("lcqmc").read_split(path, "dev", skip_bad_lines=True)


def test_json_list_errors(tmp_path):
    c3 = get_task("c3")
    doc = c3_doc(["甲"], [{"question": "乙?", "choice": ["甲", "乙"], "answer": "甲"}])
    text = json.dumps([doc, doc], ensure_ascii=False, indent=1)
    for cut in (len(text) // 2, len(text) // 2 + 9, len(text) - 3):
        truncated = write(tmp_path / "a.json", text[:cut])
        with pytest.raises(DataError, match=r"a.json:\d+: truncated JSON"):
            c3.read_split(truncated, "dev", skip_bad_lines=True)  # a broken list cannot be skipped
    broken = write(tmp_path / "a.json", text.replace('"question"', 'question', 1))
    with pytest.raises(DataError, match=r"a.json:2: invalid JSON: Expecting property name"):
        c3.read_split(broken, "dev")
    outside = json.dumps([doc, c3_doc(["甲"], [{"question": "乙?", "choice": ["甲", "乙"], "answer": "丙"}])],
                         ensure_ascii=False, indent=1)
    path = write(tmp_path / "b.json", outside)
    second_doc_line = [i for i, line in enumerate(outside.splitlines(), 1) if line == " ["][1]
    with pytest.raises(DataError, match="field 'answer': '丙' .* not one of the choices") as info:
        c3.read_split(path, "dev")
    assert info.value.line == second_doc_line
    assert len(c3.read_split(path, "dev", skip_bad_lines=True)) == 1
    with pytest.raises(DataError, match="never closed"):
        c3.read_split(write(tmp_path / "c.json", "[\n"), "dev")


@pytest.mark.parametrize("task, row, field", [
    ("ccpm", {"translation": "月", "choices": ["山", "水"], "answer": 5}, "answer"),
    ("ccpm", {"translation": "月", "choices": "山水", "answer": 0}, "choices"),
    ("math", {"text": "甲", "equation": 3}, "equation"),
    ("adgen", {"title": "", "feature": [["类型"]], "desc": "写"}, "feature"),
    ("adgen", {"content": "类型裤", "summary": "写"}, "content"),
    ("lcsts", {"text": "甲"}, "summary"),
    ("sogou-log", {"query": "甲", "pos_doc": "乙"}, "neg_doc"),
])
def test_field_errors_per_task(tmp_path, task, row, field):
    path = jsonl(tmp_path / "train.jsonl", [row])
    with pytest.raises(DataError) as info:
        get_task(task).read_split(path, "train")
    assert (info.value.line, info.value.field) == (1, field)


def test_missing_label_only_allowed_in_test(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"sentence1": "甲", "sentence2": "乙"}])
    with pytest.raises(DataError, match="field 'label': missing label"):
        get_task("lcqmc").read_split(path, "dev")
    assert get_task("lcqmc").read_split(path, "test")[0]["label"] is None


def test_duplicate_ids_are_an_error(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"sentence1": "甲", "sentence2": "乙", "label": 1, "id": 3}] * 2)
    with pytest.raises(DataError, match="id 3 appears twice"):
        get_task("lcqmc").read_split(path, "train")


def test_label_word_missing_from_vocab_is_a_clear_error(tmp_path):
    raw = {"id": 0, "sentence1": "甲", "sentence2": "乙", "label": 1}
    with pytest.raises(ValueError, match="LCQMC label word '相似' is not a single token of the loaded vocab"):
        get_task("lcqmc").encode(raw, FakeTokenizer(drop=("相似",)))
    raw = {"id": 0, "question": "甲", "context": "乙", "choices": list("甲乙丙丁红蓝猫狗"), "label": 7}
    with pytest.raises(ValueError, match="option numeral '八'"):
        get_task("c3").encode(raw, FakeTokenizer(drop=("八",)))


# --------------------------------------------------------------------------------------------------------------
# compute_metrics wiring (the metric functions themselves are tested in test_metrics.py)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_metrics(monkeypatch):
    calls = {}

    def record(name, value):
        def fn(*args, **kwargs):
            calls[name] = args
            return value
        return fn

    module = types.ModuleType("data_utils.metrics")
    module.accuracy = record("accuracy", 0.5)
    module.math_value_accuracy = record("math_value_accuracy", 0.25)
    module.rouge_char = record("rouge_char", {"rouge-1": 0.1, "rouge-2": 0.2, "rouge-l": 0.3})
    module.bleu4_char = record("bleu4_char", 0.4)
    module.distinct_n = record("distinct_n", 0.6)
    module.sacrebleu_zh = record("sacrebleu_zh", 30.0)
    module.pairwise_accuracy = record("pairwise_accuracy", 1.0)
    module.mrr = record("mrr", 0.75)
    module.ndcg = record("ndcg", 0.8)
    monkeypatch.setitem(sys.modules, "data_utils.metrics", module)
    return calls


def test_compute_metrics_wiring(fake_metrics):
    recs = [{"id": 0, "input": "", "prediction": "相似", "reference": "矛盾"},
            {"id": 1, "input": "", "prediction": "相似", "reference": None}]  # unlabelled: not scored
    assert get_task("lcqmc").compute_metrics(recs) == {"accuracy": 0.5, "num_scored": 1.0}
    assert fake_metrics["accuracy"] == (["相似"], ["矛盾"])
    gen = [{"id": 0, "input": "", "prediction": "3+2", "reference": "5"}]
    assert get_task("math").compute_metrics(gen)["value_accuracy"] == 0.25
    assert get_task("lcsts").compute_metrics(gen)["rouge-l"] == 0.3
    assert get_task("adgen").compute_metrics(gen) == {"bleu-4": 0.4, "distinct-4": 0.6, "num_scored": 1.0}
    assert fake_metrics["distinct_n"] == (["3+2"], 4)
    assert get_task("wmtencn").compute_metrics(gen)["bleu"] == 30.0
    ranked = [{"id": "q", "input": "", "prediction": [0.9, 0.1, 0.5], "reference": [1.0, 0.0, 0.0]}]
    metrics = get_task("sogou-log").compute_metrics(ranked)
    assert metrics == {"pairwise_accuracy": 1.0, "mrr": 0.75, "ndcg": 0.8, "num_scored": 1.0}
    assert fake_metrics["pairwise_accuracy"] == ([0.9, 0.9], [0.1, 0.5])
    assert get_task("ccpm").compute_metrics([recs[1]]) == {"num_scored": 0.0}


def test_compute_metrics_with_the_real_metrics():
    pytest.importorskip("data_utils.metrics")
    recs = [{"id": i, "input": "", "prediction": p, "reference": r}
            for i, (p, r) in enumerate([("三", "三"), ("一", "二")])]
    assert get_task("c3").compute_metrics(recs)["accuracy"] == pytest.approx(0.5)
    math = [{"id": 0, "input": "", "prediction": "(3+2)*1", "reference": "3+2"},
            {"id": 1, "input": "", "prediction": "50%", "reference": "1/2"}]
    assert get_task("math").compute_metrics(math)["value_accuracy"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# Exact ids with the real CPM-2 vocab
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cn_tok(cn_vocab):
    tokenization = pytest.importorskip("tokenization_enc_dec")
    return tokenization.EncDecTokenizer(str(cn_vocab))


def test_lcqmc_real_vocab_matches_the_original_ids(cn_tok):
    raw = {"id": 0, "sentence1": "今天天气很好", "sentence2": "我们去公园", "label": 0}
    out = get_task("lcqmc").encode(raw, cn_tok)
    s1, s2 = cn_tok.encode(raw["sentence1"]), cn_tok.encode(raw["sentence2"])
    assert out["enc_ids"] == [39, *s1, 41, 62, 39, *s2, 41, 11, 1348, 26050]
    assert out["candidate_ids"] == [2590, 2946] and out["answer_ids"] == [2590]


def test_numerals_and_separators_real_vocab(cn_tok):
    raw = {"id": 0, "question": "问", "context": "文", "choices": list("甲乙丙丁戊己庚辛"), "label": 7}
    out = get_task("c3").encode(raw, cn_tok)
    # the original's ids for 一..七, and 八 = 1030 (the original hard-coded 1031, which is 事件)
    assert out["candidate_ids"] == [50, 230, 156, 349, 443, 803, 950, 1030]
    options = out["enc_ids"][len(cn_tok.encode("问题：问选项：")):]
    assert options[1] == 20 and 18 in options  # 、 and ； as the original's ids 20 / 18
    gen = get_task("lcsts").encode({"id": 0, "text": "文", "summary": "文"}, cn_tok)
    assert gen["answer_ids"][-1] == 26051  # <s_1>
    assert get_task("sogou-log").encode({"id": 0, "query": "q", "docs": ["d"], "doc_ids": None,
                                         "relevance": [1.0]}, cn_tok)["candidate_ids"] == [400]  # 相关
