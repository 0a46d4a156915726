"""data_utils/dataset.py and data_utils/collate.py with a fake task and a fake tokenizer."""
import json
import logging

import pytest
import torch

from data_utils import dataset as dataset_mod
from data_utils.dataset import TaskDataset, collate, make_collate, make_prompt_mask_fn
from data_utils.samplers import BatchSampler, DistributedSampler

PAD, START, S0, S1 = 0, 1, 2, 3


class FakeTokenizer:
    """One id per character (ord % 1000 + 10); roles as docs/design.md; counts encode calls."""

    pad_id = PAD
    decoder_start_id = START

    def __init__(self, fingerprint="fp-1"):
        self.fingerprint = fingerprint
        self.calls = 0

    def get_sentinel_id(self, i):
        return {0: S0, 1: S1}[i]

    def encode(self, text):
        self.calls += 1
        return [ord(c) % 1000 + 10 for c in text]


class FakeGenerateTask:
    """JSON lines {text, answer}; target = answer + <s_1> (a generation task)."""

    name = "fakegen"
    kind = "generate"

    def read_split(self, data_path, split, ext, *, skip_bad_lines=False):
        path = data_path / f"{split}{ext}"
        return [dict(json.loads(line), id=i) for i, line in enumerate(path.read_text("utf-8").splitlines())]

    def encode(self, raw, tokenizer, *, prompt=None, max_enc_len=None):
        prefix = [-1, -2] if prompt else []
        return {
            "id": raw["id"],
            "enc_ids": prefix + tokenizer.encode(raw["text"]),
            "answer_ids": tokenizer.encode(raw["answer"]) + [tokenizer.get_sentinel_id(1)],
            "input_text": raw["text"],
            "reference": raw["answer"],
        }


class FakeClassifyTask(FakeGenerateTask):
    name = "fakecls"
    kind = "classify"

    def encode(self, raw, tokenizer, *, prompt=None, max_enc_len=None):
        candidates = [100 + k for k in range(raw["n_choices"])]
        label = raw.get("label")
        return {
            "id": raw["id"],
            "enc_ids": tokenizer.encode(raw["text"]) + [S0],
            "answer_ids": [candidates[label]] if label is not None else [],
            "candidate_ids": candidates,
            "label_index": -1 if label is None else label,
            "input_text": raw["text"],
            "reference": None if label is None else str(label),
        }


class FakeRankTask(FakeGenerateTask):
    name = "fakerank"
    kind = "rank"

    def encode(self, raw, tokenizer, *, prompt=None, max_enc_len=None):
        return {
            "id": raw["id"],
            "group_enc_ids": [tokenizer.encode(raw["query"] + d) for d in raw["docs"]],
            "label_index": 0,
            "input_text": raw["query"],
            "reference": None,
        }


def _write(folder, split, rows, ext=".jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}{ext}"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


GEN_ROWS = [{"text": "今天天气", "answer": "好"}, {"text": "你", "answer": "我们"}, {"text": "一二三四五六", "answer": "七"}]


@pytest.fixture
def gen_dir(tmp_path):
    _write(tmp_path / "data", "train", GEN_ROWS)
    return tmp_path / "data"


def _ids(text):
    return FakeTokenizer().encode(text)


def test_dataset_items_and_raw(gen_dir):
    ds = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl")
    assert len(ds) == 3
    assert ds[1] == {"id": 1, "enc_ids": _ids("你"), "answer_ids": _ids("我们") + [S1], "input_text": "你",
                     "reference": "我们", "index": 1}
    assert ds[-1]["index"] == 2
    assert ds.raw(2) == {"text": "一二三四五六", "answer": "七", "id": 2}
    assert ds.lengths() == [4, 1, 6]
    with pytest.raises(IndexError):
        ds[3]


def test_collate_layout(gen_dir):
    ds = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl")
    batch = collate([ds[0], ds[1]], pad_id=PAD, decoder_start_id=START, s0_id=S0)
    a, b = _ids("今天天气"), _ids("你")
    assert batch["enc_input_ids"].tolist() == [a, b + [PAD] * 3]  # padded to this batch's longest (4)
    assert batch["enc_input_ids"].dtype == torch.long
    assert batch["enc_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["enc_attention_mask"].dtype == torch.float32
    assert torch.equal(batch["cross_attention_mask"], batch["enc_attention_mask"])
    ans0, ans1 = _ids("好") + [S1], _ids("我们") + [S1]
    # decoder input [<s>, <s_0>] + answer[:-1]; labels [<s_0>] + answer; Ld = 1 + longest answer = 4
    assert batch["dec_input_ids"].tolist() == [[START, S0] + ans0[:-1] + [PAD], [START, S0] + ans1[:-1]]
    assert batch["labels"].tolist() == [[S0] + ans0 + [PAD], [S0] + ans1]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["loss_mask"].sum(1).tolist() == [1 + len(ans0), 1 + len(ans1)]
    assert batch["index"].tolist() == [0, 1]
    assert "candidate_ids" not in batch
    # teacher forcing: labels are the decoder input shifted left by one
    assert torch.equal(batch["labels"][:, :-1] * batch["loss_mask"][:, 1:].long(),
                       batch["dec_input_ids"][:, 1:] * batch["loss_mask"][:, 1:].long())


def test_collate_classify_candidates_and_unlabelled(tmp_path):
    rows = [{"text": "甲", "n_choices": 4, "label": 2}, {"text": "乙乙", "n_choices": 2, "label": None}]
    _write(tmp_path, "test", rows)
    ds = TaskDataset(FakeClassifyTask(), FakeTokenizer(), tmp_path, "test", ".jsonl")
    batch = collate([ds[0], ds[1]], pad_id=PAD, decoder_start_id=START, s0_id=S0)
    assert batch["candidate_ids"].tolist() == [[100, 101, 102, 103], [100, 101, -1, -1]]
    assert batch["label_index"].tolist() == [2, -1]
    assert batch["dec_input_ids"].tolist() == [[START, S0], [START, S0]]
    assert batch["labels"].tolist() == [[S0, 102], [S0, PAD]]
    assert batch["loss_mask"].tolist() == [[1, 1], [1, 0]]


def test_collate_rank_flattens_groups(tmp_path):
    rows = [{"query": "问", "docs": ["甲", "乙乙"]}, {"query": "答", "docs": ["丙", "丁", "戊戊戊"]}]
    _write(tmp_path, "dev", rows)
    ds = TaskDataset(FakeRankTask(), FakeTokenizer(), tmp_path, "dev", ".jsonl")
    batch = collate([ds[0], ds[1]], pad_id=PAD, decoder_start_id=START, s0_id=S0)
    assert batch["group_size"] == 3
    assert batch["enc_input_ids"].shape == (6, 4)
    # row b*G + g is member g of example b; example 0's missing third member repeats its first
    assert batch["enc_input_ids"][1].tolist() == _ids("问乙乙") + [PAD]
    assert batch["enc_input_ids"][2].tolist() == batch["enc_input_ids"][0].tolist()
    assert batch["enc_input_ids"][5].tolist() == _ids("答戊戊戊")
    assert batch["group_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["enc_attention_mask"].shape == (6, 4)
    assert batch["dec_input_ids"].tolist() == [[START, S0]] * 6
    assert batch["label_index"].tolist() == [0, 0] and batch["index"].tolist() == [0, 1]
    assert ds.lengths() == [3, 4]


def test_prompt_mask_ablations():
    ids = torch.tensor([[-1, -2, 50, 51, PAD]])
    padding = torch.tensor([[1.0, 1, 1, 1, 0]])
    p2t = make_prompt_mask_fn(mask_prompt2token=True, mask_token2prompt=False)(ids, padding)
    assert p2t.shape == (1, 1, 5, 5)
    # prompt queries see only prompt keys; token queries see every real key
    assert p2t[0, 0].tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0],
                                  [1, 1, 1, 1, 0]]
    t2p = make_prompt_mask_fn(mask_prompt2token=False, mask_token2prompt=True)(ids, padding)
    assert t2p[0, 0].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                  [0, 0, 1, 1, 0]]
    assert make_prompt_mask_fn(mask_prompt2token=False, mask_token2prompt=False) is None


def test_make_collate_with_prompt_config_and_dataloader(gen_dir):
    tok = FakeTokenizer()
    ds = TaskDataset(FakeGenerateTask(), tok, gen_dir, "train", ".jsonl", prompt={"enc": {"prompt_len": 2}})
    fn = make_collate(FakeGenerateTask(), tok, {"mask_prompt2token": True})
    sampler = DistributedSampler(len(ds), shuffle=False, seed=0, dp_rank=0, dp_size=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BatchSampler(sampler, 2, False), collate_fn=fn)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0]["enc_attention_mask"].shape == (2, 1, 6, 6)
    assert batches[0]["enc_input_ids"][0, :2].tolist() == [-1, -2]
    assert make_collate(FakeGenerateTask(), tok)([ds[0]])["enc_attention_mask"].dim() == 2


def test_cache_hit_and_invalidation(gen_dir):
    task = FakeGenerateTask()
    tok = FakeTokenizer()
    first = TaskDataset(task, tok, gen_dir, "train", ".jsonl")
    assert not first.cache_hit and tok.calls > 0
    assert first.cache_path.parent == gen_dir / ".cpm2_cache" and first.cache_path.is_file()
    torch.load(first.cache_path, weights_only=True)  # loadable without unpickling arbitrary objects

    tok2 = FakeTokenizer()
    second = TaskDataset(task, tok2, gen_dir, "train", ".jsonl")
    assert second.cache_hit and tok2.calls == 0
    assert [second[i] for i in range(3)] == [first[i] for i in range(3)]
    assert second.raw(0)["text"] == "今天天气"  # raw examples are read lazily after a hit

    # each ingredient of the key invalidates it
    assert not TaskDataset(task, FakeTokenizer("fp-2"), gen_dir, "train", ".jsonl").cache_hit
    assert not TaskDataset(task, FakeTokenizer(), gen_dir, "train", ".jsonl", max_enc_len=3).cache_hit
    assert not TaskDataset(task, FakeTokenizer(), gen_dir, "train", ".jsonl", prompt={"x": 1}).cache_hit
    _write(gen_dir, "train", GEN_ROWS[:2] + [{"text": "变了", "answer": "七"}])
    changed = TaskDataset(task, FakeTokenizer(), gen_dir, "train", ".jsonl")
    assert not changed.cache_hit and changed[2]["input_text"] == "变了"
    assert TaskDataset(task, FakeTokenizer(), gen_dir, "train", ".jsonl").cache_hit


def test_corrupt_cache_is_rebuilt(gen_dir, caplog):
    first = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl")
    first.cache_path.write_bytes(b"not a torch file")
    again = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl")
    assert not again.cache_hit and "ignoring unreadable cache" in caplog.text
    assert again[0] == first[0]


def test_cache_falls_back_to_temp_dir(gen_dir, tmp_path, monkeypatch):
    default = gen_dir / ".cpm2_cache"
    real = dataset_mod._writable_dir
    monkeypatch.setattr(dataset_mod, "_writable_dir", lambda p: False if p == default else real(p))
    monkeypatch.setattr(dataset_mod.tempfile, "tempdir", str(tmp_path / "tmp"))
    ds = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl")
    assert ds.cache_path.parent == tmp_path / "tmp" / "cpm2_cache"
    explicit = tmp_path / "explicit"
    assert TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl",
                       cache_dir=explicit).cache_path.parent == explicit


def test_no_fingerprint_means_no_cache(gen_dir, caplog):
    tok = FakeTokenizer()
    del tok.fingerprint
    ds = TaskDataset(FakeGenerateTask(), tok, gen_dir, "train", ".jsonl")
    assert ds.cache_path is None and "will not be cached" in caplog.text


def test_truncation_is_counted_and_logged(gen_dir, caplog):
    caplog.set_level(logging.INFO, logger="data_utils.dataset")
    ds = TaskDataset(FakeGenerateTask(), FakeTokenizer(), gen_dir, "train", ".jsonl", max_enc_len=3, max_dec_len=2)
    assert "2 of 3 encoder inputs truncated to 3 tokens (0 more are exactly 3 long" in caplog.text
    assert "1 of 3 answers truncated to 2 tokens" in caplog.text
    assert [len(ds[i]["enc_ids"]) for i in range(3)] == [3, 1, 3]
    assert ds[1]["answer_ids"] == _ids("我") + [S1]  # a generation target keeps its stop token


def test_rank_truncation_cuts_every_member(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data_utils.dataset")
    _write(tmp_path, "dev", [{"query": "问", "docs": ["甲", "乙乙乙"]}])
    ds = TaskDataset(FakeRankTask(), FakeTokenizer(), tmp_path, "dev", ".jsonl", max_enc_len=2)
    assert [len(g) for g in ds[0]["group_enc_ids"]] == [2, 2]
    assert "1 of 1 encoder inputs truncated to 2 tokens" in caplog.text


def test_ratio_and_num_take_prefixes(gen_dir):
    task, tok = FakeGenerateTask(), FakeTokenizer()
    assert len(TaskDataset(task, tok, gen_dir, "train", ".jsonl", ratio=0.5)) == 1
    assert len(TaskDataset(task, tok, gen_dir, "train", ".jsonl", num=2)) == 2
    assert len(TaskDataset(task, tok, gen_dir, "train", ".jsonl", ratio=1.0, num=10)) == 3
    ds = TaskDataset(task, tok, gen_dir, "train", ".jsonl", ratio=0.7, num=1)
    assert len(ds) == 1 and ds[0]["input_text"] == "今天天气"
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}, {"num": 0}, {"max_enc_len": 0}):
        with pytest.raises(ValueError):
            TaskDataset(task, tok, gen_dir, "train", ".jsonl", **bad)


def test_collate_empty_batch_raises():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=PAD, decoder_start_id=START, s0_id=S0)


def test_real_tokenizer_fingerprint_keys_cache(gen_dir, cn_vocab):
    from tokenization_enc_dec import load_tokenizer

    tok = load_tokenizer(cn_vocab)
    ds = TaskDataset(FakeGenerateTask(), tok, gen_dir, "train", ".jsonl")
    batch = make_collate(FakeGenerateTask(), tok)([ds[0], ds[1]])
    assert batch["dec_input_ids"][0, :2].tolist() == [tok.decoder_start_id, tok.get_sentinel_id(0)]
    assert TaskDataset(FakeGenerateTask(), tok, gen_dir, "train", ".jsonl").cache_hit


def test_empty_candidate_lists_do_not_make_a_classify_batch():
    items = [{"enc_ids": [5], "answer_ids": [6, S1], "candidate_ids": [], "label_index": -1}]
    batch = collate(items, pad_id=PAD, decoder_start_id=START, s0_id=S0)
    assert "candidate_ids" not in batch and "label_index" not in batch


def test_real_tasks_and_tokenizer_end_to_end(tmp_path, cn_vocab):
    """The registered tasks' encode output goes through the dataset, the cache and collate unchanged."""
    from data_utils.tasks import get_task, task_names
    from tokenization_enc_dec import load_tokenizer

    if not {"lcqmc", "math", "sogou-log"} <= set(task_names()):
        pytest.skip("lcqmc / math / sogou-log tasks not registered yet")
    tok = load_tokenizer(cn_vocab)
    _write(tmp_path / "lcqmc", "dev", [{"sentence1": "今天天气好", "sentence2": "天气不错", "label": 1},
                                       {"sentence1": "我饿了", "sentence2": "他走了", "label": 0}])
    task = get_task("lcqmc")
    ds = TaskDataset(task, tok, tmp_path / "lcqmc", "dev", ".jsonl")
    batch = make_collate(task, tok)([ds[0], ds[1]])
    similar, contradict = tok.token_to_id("相似"), tok.token_to_id("矛盾")
    assert batch["candidate_ids"].tolist() == [[contradict, similar]] * 2
    assert batch["labels"].tolist() == [[tok.get_sentinel_id(0), similar], [tok.get_sentinel_id(0), contradict]]
    assert batch["label_index"].tolist() == [1, 0]
    assert TaskDataset(task, tok, tmp_path / "lcqmc", "dev", ".jsonl").cache_hit

    math_dir = tmp_path / "math"
    math_dir.mkdir()
    (math_dir / "dev.json").write_text(json.dumps([{"text": "3加2等于多少？", "equation": "x=3+2"}],
                                                  ensure_ascii=False), "utf-8")
    mtask = get_task("math")
    mbatch = make_collate(mtask, tok)([TaskDataset(mtask, tok, math_dir, "dev", ".json")[0]])
    assert mbatch["labels"][0, -1].item() == tok.get_sentinel_id(1)  # generation targets end with <s_1>
    assert "candidate_ids" not in mbatch

    _write(tmp_path / "sogou", "train", [{"query": "天气", "pos_doc": "今日天气", "neg_doc": "股票行情"}], ext=".json")
    stask = get_task("sogou-log")
    sds = TaskDataset(stask, tok, tmp_path / "sogou", "train", ".json")
    sbatch = make_collate(stask, tok)([sds[0]])
    assert sbatch["group_size"] == 2 and sbatch["enc_input_ids"].shape[0] == 2
    assert sbatch["label_index"].tolist() == [0]
