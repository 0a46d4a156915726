"""The real public samples in ../shared/data read completely, none dropped, and encode with the real vocab.

Skipped, with the reason shown, when ../shared (or CPM2_SHARED_DIR) is absent. Counts are printed (``-s``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_utils.prompt import PromptConfig
from data_utils.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cn_tok_module():
    return {}


@pytest.fixture
def cn_tok(cn_vocab, cn_tok_module):
    tokenization = pytest.importorskip("tokenization_enc_dec")
    if "tok" not in cn_tok_module:  # one tokenizer (and its caches) for the module
        cn_tok_module["tok"] = tokenization.EncDecTokenizer(str(cn_vocab))
    return cn_tok_module["tok"]


def count_lines(path) -> int:
    return sum(1 for line in path.read_text("utf-8").splitlines() if line.strip())


def test_ccpm_valid_and_test_public(shared_data, cn_tok):
    ccpm = get_task("ccpm")
    folder = shared_data / "ccpm"
    dev, test = ccpm.read_split(folder, "dev"), ccpm.read_split(folder, "test")  # valid.jsonl, test_public.jsonl
    print(f"CCPM dev (valid.jsonl): {len(dev)}, test (test_public.jsonl): {len(test)}")
    assert len(dev) == count_lines(folder / "valid.jsonl") == 2720
    assert len(test) == count_lines(folder / "test_public.jsonl") == 2720
    assert all(e["label"] is not None for e in dev) and all(e["label"] is None for e in test)
    numerals = {50, 230, 156, 349}
    for example in dev[:300] + test[:300]:
        out = ccpm.encode(example, cn_tok)
        assert set(out["candidate_ids"]) == numerals and min(out["enc_ids"]) >= 0


def test_c3_dev_and_test(shared_data, cn_tok):
    c3 = get_task("c3")
    folder = shared_data / "c3"
    for split, name in (("dev", "c3-d-dev.json"), ("test", "c3-d-test.json")):
        documents = json.loads((folder / name).read_text("utf-8"))
        examples = c3.read_split(folder, split)  # c3-d-{split}.json (the c3-m files are not in the sample)
        questions = sum(len(doc[1]) for doc in documents)
        print(f"C3 {split} ({name}): {len(documents)} documents, {len(examples)} questions")
        assert len(examples) == questions
        assert len({e["id"] for e in examples}) == questions
        assert examples[0]["context"] == "\n".join(documents[0][0])  # every line of the context
    config = PromptConfig.from_file(ROOT / "configs" / "prompt" / "c3" / "c3_33_34_33_0.json")
    for example in c3.read_split(folder, "dev")[:200]:
        out = c3.encode(example, cn_tok)
        assert len(out["enc_ids"]) <= 768 and out["answer_ids"][0] in out["candidate_ids"]
        prompted = c3.encode(example, cn_tok, prompt=config)["enc_ids"]
        assert len(prompted) <= 768 and sorted(-i - 1 for i in prompted if i < 0) == list(range(100))


def test_math23k_public_file(shared_data, cn_tok):
    math = get_task("math")
    path = shared_data / "math23k" / "test23k_processed.json"
    examples = math.read_split(path, "test")
    print(f"Math23K test23k_processed.json: {len(examples)} problems")
    assert len(examples) == 1000
    raw = json.loads(path.read_text("utf-8"))
    assert [e["text"] for e in examples] == [r["original_text"] for r in raw]  # never the temp_a placeholders
    assert not any("temp_" in e["text"] for e in examples)
    assert all(e["equation"].startswith("x=") and e["target"] == e["equation"][2:] for e in examples)
    assert all("ans" in e for e in examples)
    out = math.encode(examples[0], cn_tok)
    assert out["answer_ids"][-1] == cn_tok.get_sentinel_id(1) and out["reference"] == "44*20"


def test_adgen_public_dev(shared_data, cn_tok):
    adgen = get_task("adgen")
    path = shared_data / "adgen" / "dev.json"
    examples = adgen.read_split(path, "dev")
    print(f"AdGen dev.json: {len(examples)} lines")
    assert len(examples) == count_lines(path) == 1070
    first = examples[0]
    assert first["feature"][0] == ("类型", "上衣") and first["desc"].startswith("简约而不简单的牛仔外套")
    out = adgen.encode(first, cn_tok)
    semicolon, comma, colon = (cn_tok.token_to_id(w) for w in "；，：")
    assert out["enc_ids"][-1] == semicolon and out["enc_ids"].count(colon) == len(first["feature"])
    assert out["enc_ids"].count(comma) >= len(first["feature"]) - 1
