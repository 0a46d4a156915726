"""tools/prepare_data.py: public layouts -> CPM-2 layout files, read back by the same task readers."""
import json

import pytest

from data_utils.tasks import get_task, task_names
from tools import prepare_data


def _need(task):
    if task not in task_names():
        pytest.skip(f"task {task!r} is not registered yet (data_utils/tasks/{task}.py)")
    return get_task(task)


def test_lcqmc_tsv_to_jsonl(tmp_path):
    _need("lcqmc")
    src = tmp_path / "public"
    src.mkdir()
    (src / "train.tsv").write_text("text_a\ttext_b\tlabel\n今天天气好\t天气不错\t1\n我饿了\t他走了\t0\n", "utf-8")
    (src / "dev.tsv").write_text("吃了吗\t吃过了吗\t1\n", "utf-8")
    (src / "test.tsv").write_text("问一\t问二\n", "utf-8")  # unlabelled public test: two columns
    out = tmp_path / "cpm2"
    written = prepare_data.prepare("lcqmc", src, out)
    assert written == {"train": out / "train.jsonl", "dev": out / "dev.jsonl", "test": out / "test.jsonl"}
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text("utf-8").splitlines()]
    assert lines == [{"id": 0, "sentence1": "今天天气好", "sentence2": "天气不错", "label": 1},
                     {"id": 1, "sentence1": "我饿了", "sentence2": "他走了", "label": 0}]
    assert json.loads((out / "test.jsonl").read_text("utf-8")) == {"id": 0, "sentence1": "问一", "sentence2": "问二"}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic writes leave no temp files


def test_math_public_to_cpm2_json_list(tmp_path):
    _need("math")
    public = [
        {"id": "1", "original_text": "小明有3个苹果，又买了2个，一共多少个？", "text": "小明 有 temp_a 个 苹果",
         "equation": "x=3+2", "ans": "5"},
        {"id": "2", "original_text": "一半是多少？", "text": "一半 是 多少", "equation": "x=1/2", "ans": "50%"},
    ]
    src = tmp_path / "public"
    src.mkdir()
    (src / "train.json").write_text(json.dumps(public, ensure_ascii=False), "utf-8")
    out = tmp_path / "cpm2"
    prepare_data.prepare("math", src, out, splits=["train"])
    items = json.loads((out / "train.json").read_text("utf-8"))
    assert isinstance(items, list)
    # original_text (not the placeholder `text`) becomes CPM-2's `text`
    assert items == [{"id": "1", "text": "小明有3个苹果，又买了2个，一共多少个？", "equation": "x=3+2", "ans": "5"},
                     {"id": "2", "text": "一半是多少？", "equation": "x=1/2", "ans": "50%"}]


def test_ccpm_valid_becomes_dev(tmp_path):
    _need("ccpm")
    src = tmp_path / "public"
    src.mkdir()
    row = {"translation": "涤荡万里，威名远扬。", "choices": ["万里静氛埃", "万里绝氛埃", "万里绝风烟", "万里绝妖氛"]}
    (src / "valid.jsonl").write_text(json.dumps(dict(row, answer=3), ensure_ascii=False) + "\n", "utf-8")
    (src / "test_public.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "cpm2"
    written = prepare_data.prepare("ccpm", src, out)
    assert set(written) == {"dev", "test"}  # no train file in this release
    assert json.loads((out / "dev.jsonl").read_text("utf-8")) == dict(row, answer=3, id=0)
    assert "answer" not in json.loads((out / "test.jsonl").read_text("utf-8"))


def test_c3_questions_regrouped_into_documents(tmp_path):
    _need("c3")
    docs = [[["男：你好", "女：你好啊"], [{"question": "他们在做什么?", "choice": ["打招呼", "吃饭"], "answer": "打招呼"},
                                     {"question": "谁先说话?", "choice": ["男", "女"], "answer": "男"}], "1-1"],
            [["一段文章。"], [{"question": "问?", "choice": ["甲", "乙", "丙"], "answer": "丙"}], "2-7"]]
    src = tmp_path / "public"
    src.mkdir()
    (src / "c3-d-dev.json").write_text(json.dumps(docs, ensure_ascii=False), "utf-8")
    out = tmp_path / "cpm2"
    prepare_data.prepare("c3", src, out, splits=["dev"])
    items = json.loads((out / "dev.json").read_text("utf-8"))
    assert [item[2] for item in items] == ["1-1", "2-7"]
    assert items[0][0] == ["男：你好", "女：你好啊"]  # every context line kept, not only the first
    assert [q["answer"] for q in items[0][1]] == ["打招呼", "男"]


def test_real_ccpm_and_math_samples(shared_data, tmp_path):
    _need("ccpm")
    _need("math")
    out = tmp_path / "ccpm"
    written = prepare_data.prepare("ccpm", shared_data / "ccpm", out)
    assert set(written) == {"dev", "test"}
    assert len((out / "dev.jsonl").read_text("utf-8").splitlines()) == 2720
    math_out = tmp_path / "math"
    prepare_data.prepare("math", shared_data / "math23k" / "test23k_processed.json", math_out, splits=["test"])
    items = json.loads((math_out / "test.json").read_text("utf-8"))
    assert len(items) == 1000 and set(items[0]) == {"id", "text", "equation", "ans"}


def test_errors_and_cli(tmp_path, capsys):
    _need("lcqmc")
    src = tmp_path / "public"
    src.mkdir()
    with pytest.raises(ValueError, match="no train, dev, test files"):
        prepare_data.prepare("lcqmc", src, tmp_path / "out")
    with pytest.raises(ValueError, match="source folder"):
        prepare_data.prepare("lcqmc", src, src)
    with pytest.raises(ValueError, match="unknown task"):
        prepare_data.prepare("nope", src, tmp_path / "out")
    (src / "train.tsv").write_text("a\tb\t1\nbroken line\n", "utf-8")
    assert prepare_data.main(["--task", "lcqmc", "--src", str(src), "--out", str(tmp_path / "out")]) == 1
    assert prepare_data.main(["--task", "lcqmc", "--src", str(src), "--out", str(tmp_path / "out"),
                              "--skip-bad-lines"]) == 0
    assert "train:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--splits"):
        prepare_data.prepare("lcqmc", src / "train.tsv", tmp_path / "out2")


def test_adgen_public_content_to_phvm_lines(shared_data, tmp_path):
    _need("adgen")
    out = tmp_path / "adgen"
    prepare_data.prepare("adgen", shared_data / "adgen", out, splits=["dev"])
    lines = (out / "dev.json").read_text("utf-8").splitlines()
    assert len(lines) == 1070
    first = json.loads(lines[0])
    assert first["feature"][0] == ["类型", "上衣"] and first["title"] == "" and first["desc"].startswith("简约")


def test_wmt_parallel_files_to_swapped_json_list(tmp_path):
    _need("wmtencn")
    src = tmp_path / "public"
    src.mkdir()
    (src / "dev.en").write_text("Hello world.\nGood morning.\n", "utf-8")
    (src / "dev.zh").write_text("你好，世界。\n早上好。\n", "utf-8")
    out = tmp_path / "cpm2"
    prepare_data.prepare("wmtencn", src, out, splits=["dev"])
    items = json.loads((out / "dev.json").read_text("utf-8"))
    # CPM-2 files keep the original's swap: the English input sits in "target"
    assert items[0] == {"index": 0, "target": "Hello world.", "source": "你好，世界。"}


def test_sogou_pairs_and_lists(tmp_path):
    _need("sogou-log")
    src = tmp_path / "public"
    src.mkdir()
    (src / "train.json").write_text(json.dumps({"query": "天气", "pos_doc": "今日天气", "neg_doc": "股票"},
                                               ensure_ascii=False) + "\n", "utf-8")
    (src / "test.json").write_text(json.dumps({"query_id": "q1", "query": "天气", "doc": [
        {"sogou_id": "d1", "title": "今日天气", "label": 2}, {"sogou_id": "d2", "title": "股票", "label": 0}]},
        ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "cpm2"
    assert set(prepare_data.prepare("sogou-log", src, out)) == {"train", "test"}
    test = json.loads((out / "test.json").read_text("utf-8"))
    assert test["doc"][0] == {"sogou_id": "d1", "title": "今日天气", "label": 2.0}
