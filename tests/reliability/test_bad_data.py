"""Bad data: every reader, given truncated JSON, wrong types, missing fields, empty files, non-UTF-8 bytes, huge
lines or labels outside the label set, raises `DataError` naming file, line and field (or, with
--skip-bad-lines, counts and skips the line), and finetune_cpm2.py stops with it before any training. Inputs
longer than --enc-seq-length are truncated with a count in the log. Hypothesis fuzzes the readers and the
tokenizer: nothing but `DataError` may come out.

Complements tests/data_utils/test_tasks.py (which checks the LCQMC error kinds in depth, C3's JSON-list errors
and one field error per task) by running every error kind against every task.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from data_utils.errors import DataError
from data_utils.tasks import get_task, task_names
from tests.training.helpers import base_args, make_task_dir, run_finetune

# One good record per task (JSON-lines layout, line i) and, per error kind, (broken record, field named).
# C3 records are documents [[context lines], [questions], doc_id].


def _c3(i, **qa):
    return [["甲说话。"], [{"question": "乙?", "choice": ["甲", "乙"], "answer": "甲", **qa}], f"d{i}"]


GOOD = {
    "lcqmc": lambda i: {"sentence1": "甲", "sentence2": "乙", "label": 1},
    "ccpm": lambda i: {"translation": "月", "choices": ["山", "水"], "answer": 0},
    "c3": _c3,
    "math": lambda i: {"text": "甲有3个", "equation": "x=3+2"},
    "lcsts": lambda i: {"text": "正文", "summary": "摘要"},
    "adgen": lambda i: {"title": "", "feature": [["类型", "裤"]], "desc": "写"},
    "wmtencn": lambda i: {"source": "新闻", "target": "news"},
    "sogou-log": lambda i: {"query": "天气", "pos_doc": "好", "neg_doc": "坏"},
}
WRONG_TYPE = {  # a field holding the wrong JSON type
    "lcqmc": ({"sentence1": 3, "sentence2": "乙", "label": 1}, "sentence1"),
    "ccpm": ({"translation": "月", "choices": ["山", 2], "answer": 0}, "choices"),
    "c3": ([[7], [{"question": "乙?", "choice": ["甲"], "answer": "甲"}], "d"], "context"),
    "math": ({"text": "甲", "equation": ["x=1"]}, "equation"),
    "lcsts": ({"text": "正文", "summary": {"a": 1}}, "summary"),
    "adgen": ({"title": "", "feature": [["类型", "裤"]], "desc": 3.5}, "desc"),
    "wmtencn": ({"source": "新闻", "target": None}, "target"),
    "sogou-log": ({"query": "天气", "pos_doc": 1, "neg_doc": "坏"}, "pos_doc"),
}
MISSING = {  # a required field left out
    "lcqmc": ({"sentence1": "甲", "label": 1}, "sentence2"),
    "ccpm": ({"choices": ["山", "水"], "answer": 0}, "translation"),
    "c3": ([["甲"], [{"question": "乙?", "answer": "甲"}], "d"], "choice"),
    "math": ({"equation": "x=1"}, "text"),
    "lcsts": ({"summary": "摘要"}, "text"),
    "adgen": ({"title": "", "desc": "写"}, "feature"),
    "wmtencn": ({"target": "news"}, "source"),
    "sogou-log": ({"query": "天气", "pos_doc": "好"}, "neg_doc"),
}
OUTSIDE = {  # a label (or label-like value) outside what the task accepts
    "lcqmc": ({"sentence1": "甲", "sentence2": "乙", "label": 2}, "label"),
    "ccpm": ({"translation": "月", "choices": ["山", "水"], "answer": 2}, "answer"),
    "c3": (_c3(9, answer="丙"), "answer"),
    "math": ({"text": "甲", "equation": "x=1", "ans": [5]}, "ans"),
    "lcsts": ({"text": "正文", "summary": "摘要", "human_label": "high"}, "human_label"),
    "adgen": ({"title": "", "feature": [["类型"]], "desc": "写"}, "feature"),
    "wmtencn": None,  # no labels: a translation pair has no label set
    "sogou-log": ({"query_id": "q", "query": "天气", "doc": [{"title": "好", "label": "high"}]}, "label"),
}
TASKS = sorted(GOOD)


def test_the_matrix_covers_every_registered_task():
    assert TASKS == task_names()


def _line(record) -> str:
    return json.dumps(record, ensure_ascii=False)


def _file(tmp_path: Path, task: str, records: list[str | bytes]) -> tuple[Path, list[int]]:
    """Three records, one per line: JSON lines, or for C3 (whose file is one JSON list of documents, the only
    layout where a document is itself a list) a list with one document per line. Returns the path and the
    line number of each record."""
    path = tmp_path / f"train{get_task(task).default_ext}"
    records = [r if isinstance(r, bytes) else r.encode("utf-8") for r in records]
    if task == "c3":
        path.write_bytes(b"[\n" + b",\n".join(records) + b"\n]\n")
        return path, [2, 3, 4]
    path.write_bytes(b"\n".join(records) + b"\n")
    return path, [1, 2, 3]


def _expect_error_at(path: Path, task: str, line: int, field: str | None, match: str | None = None,
                     split: str = "train", skippable: bool = True):
    with pytest.raises(DataError, match=match) as info:
        get_task(task).read_split(path, split)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert str(err).startswith(f"{path}:{line}: " + (f"field {field!r}: " if field else ""))
    if not skippable:  # a syntax error inside a JSON list: the rest of the list cannot be found reliably
        with pytest.raises(DataError):
            get_task(task).read_split(path, split, skip_bad_lines=True)
        return
    result = get_task(task).read_split_result(path, split, skip_bad_lines=True)
    assert [e.line for e in result.skipped] == [line] and len(result.examples) >= 2


CASES = {"wrong_type": WRONG_TYPE, "missing": MISSING, "outside": OUTSIDE}


@pytest.mark.parametrize("kind, task", [(k, t) for k in CASES for t in TASKS if CASES[k][t] is not None])
def test_field_errors_name_file_line_and_field(tmp_path, task, kind):
    record, field = CASES[kind][task]
    split = "test" if task == "sogou-log" and kind == "outside" else "train"  # the list layout is the test one
    if split == "test":
        good = [{"query_id": f"q{i}", "query": "天气", "doc": [{"title": "好", "label": 1}]} for i in (0, 2)]
        records = [_line(good[0]), _line(record), _line(good[1])]
    else:
        records = [_line(GOOD[task](0)), _line(record), _line(GOOD[task](2))]
    path, lines = _file(tmp_path, task, records)
    _expect_error_at(path, task, lines[1], field, split=split)


@pytest.mark.parametrize("task", TASKS)
def test_truncated_json(tmp_path, task):
    good = [_line(GOOD[task](i)) for i in range(3)]
    path, lines = _file(tmp_path, task, [good[0], good[1][:-4], good[2]])
    # a record cut inside a value may swallow the next line before the parser gives up: either message, same line
    _expect_error_at(path, task, lines[1], None, "invalid JSON|truncated JSON", skippable=task != "c3")
    if task == "c3":  # the list itself is cut short
        path.write_text("[\n" + good[0] + ",\n" + good[1][:-4] + "\n", encoding="utf-8")
        _expect_error_at(path, task, 3, None, "truncated JSON: the file ends inside this record", skippable=False)
        return
    path, lines = _file(tmp_path, task, [good[0], good[1], good[2][: len(good[2]) // 2]])
    _expect_error_at(path, task, lines[2], None, "truncated JSON: the file ends inside this record")


@pytest.mark.parametrize("task", TASKS)
def test_non_utf8_bytes(tmp_path, task):
    records = [_line(GOOD[task](0)).encode(), _line(GOOD[task](1)).encode("gbk"), _line(GOOD[task](2)).encode()]
    path, lines = _file(tmp_path, task, records)
    _expect_error_at(path, task, lines[1], None, r"not valid UTF-8 \(byte 0x[0-9a-f]{2} at column \d+\); convert",
                     skippable=True)  # the bad line is blanked, and the list around it still parses


@pytest.mark.parametrize("task", TASKS)
def test_empty_file(tmp_path, task):
    path = tmp_path / f"train{get_task(task).default_ext}"
    path.write_bytes(b"  \n\n")
    for skip in (False, True):  # skipping cannot make an empty file useful
        with pytest.raises(DataError, match=rf"^{path}: the file is empty"):
            get_task(task).read_split(path, "train", skip_bad_lines=skip)


@pytest.mark.parametrize("task", TASKS)
def test_huge_line_is_read_whole(tmp_path, task):
    """A 2 MB record is data, not an error; the encoder limit (--enc-seq-length) cuts it later."""
    huge = _line(GOOD[task](1)).replace("甲" if task in ("lcqmc", "c3", "math") else
                                       {"ccpm": "月", "lcsts": "正文", "adgen": "裤", "wmtencn": "news",
                                        "sogou-log": "天气"}[task], "长" * 2_000_000, 1)
    assert len(huge) > 2_000_000
    path, _ = _file(tmp_path, task, [_line(GOOD[task](0)), huge, _line(GOOD[task](2))])
    examples = get_task(task).read_split(path, "train")
    assert len(examples) == 3 and "长" * 2_000_000 in json.dumps(examples, ensure_ascii=False)


# ---------------------------------------------------------------- end to end, through finetune_cpm2.py

TRAIN = ["--do-train", "--random-init", "--batch-size", "4", "--log-interval", "1", "--train-iters", "1"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"), train=16, dev=4, test=4)


def _with_bad_lines(data: Path, out: Path, bad: dict[int, str]) -> Path:
    """A copy of the task's data dir whose train file has the given lines (1-based) replaced."""
    out.mkdir()
    for f in data.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    for number, text in bad.items():
        lines[number - 1] = text
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_bad_data_stops_finetune_before_training(task_dir, tmp_path):
    data, vocab = task_dir
    bad = _with_bad_lines(data, tmp_path / "data", {5: '{"sentence1": "我", "sentence2": "你", "label": 7}'})
    save = tmp_path / "run"
    proc = run_finetune(base_args(bad, vocab, save, *TRAIN), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {bad}/train.jsonl:5: field 'label': must be one of [0, 1], got 7" in proc.stderr
    assert not (save / "checkpoints").exists() and "model:" not in proc.stdout and "training:" not in proc.stdout


def test_skip_bad_lines_and_truncation_are_counted_in_the_log(task_dir, tmp_path):
    data, vocab = task_dir
    bad = _with_bad_lines(data, tmp_path / "data", {3: '{"sentence1": "我"', 9: '{"sentence1": 1, "sentence2": "你"}'})
    save = tmp_path / "run"
    proc = run_finetune(base_args(bad, vocab, save, *TRAIN, "--skip-bad-lines", "--enc-seq-length", "6"))
    log = proc.stdout + proc.stderr
    assert "lcqmc train: skipped 2 bad line(s) (--skip-bad-lines); first: " + f"{bad}/train.jsonl:3: invalid JSON" in log
    assert "training: 14 examples" in log
    # LCQMC cuts inside encode (keeping the template's order), so its cut inputs are counted as "exactly 6 long"
    counted = re.search(r"lcqmc train: (\d+) of 14 encoder inputs truncated to 6 tokens \((\d+) more are exactly 6 "
                        r"long", log)
    assert counted and int(counted.group(1)) + int(counted.group(2)) == 14, log[-3000:]
    assert (save / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# ---------------------------------------------------------------- fuzzing: nothing but DataError

_FIELDS = sorted({"sentence1", "sentence2", "label", "translation", "choices", "answer", "question", "choice",
                  "text", "original_text", "equation", "ans", "summary", "human_label", "title", "tags", "feature",
                  "desc", "content", "source", "target", "index", "query", "pos_doc", "neg_doc", "query_id", "doc",
                  "sogou_id", "id"})
_scalars = st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=True) | st.text(max_size=8) \
    | st.sampled_from(["0", "1", " 2 ", "甲", "x=1", "类型#裤", "锟斤拷", "²", "类型#裤*版型"])
_json = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.sampled_from(_FIELDS), kids, max_size=6), max_leaves=12)
_records = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=8) | _json


def _read_only_data_errors(task: str, payload: bytes, split: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{split}{get_task(task).default_ext}"
        path.write_bytes(payload)
        for skip in (False, True):
            try:
                get_task(task).read_split(path, split, skip_bad_lines=skip)
            except DataError:
                pass


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.mark.parametrize("task", TASKS)
@FUZZ
@given(payload=st.binary(max_size=200), split=st.sampled_from(["train", "test"]))
def test_fuzz_random_bytes(task, payload, split):
    _read_only_data_errors(task, payload, split)


@pytest.mark.parametrize("task", TASKS)
@FUZZ
@given(records=st.lists(_records, min_size=1, max_size=4), as_list=st.booleans(),
       split=st.sampled_from(["train", "test"]))
def test_fuzz_json_records(task, records, as_list, split):
    text = json.dumps(records, ensure_ascii=False) if as_list else \
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    _read_only_data_errors(task, text.encode("utf-8"), split)


@pytest.fixture(scope="module")
def tokenizer(task_dir):
    from tokenization_enc_dec import load_tokenizer

    return load_tokenizer(str(task_dir[1]))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("utf-8", "replace")))
def test_fuzz_tokenizer(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert isinstance(tokenizer.decode(ids), str)
