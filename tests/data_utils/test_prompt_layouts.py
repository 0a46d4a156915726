"""Prompt configs and the per-task soft-prompt layouts (``reference/original-toolkit.md`` §6).

Every shipped config is applied to its task and the encoder ids are compared with a straight transcription of
the original's formulas (``ref_*`` below), and with the counts the reference doc states. Run with ``-s`` to see
each layout printed as runs: ``P[a..b)`` = prompt positions a..b-1, ``T<n>`` = n text tokens, ``；`` = the
separator the original inserts when a ratio is 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_utils.prompt import PromptConfig, prompt_attention_mask, prompt_ids
from data_utils.tasks import get_task

from tests.data_utils.test_tasks import FakeTokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "prompt"
ALL_CONFIGS = sorted(CONFIGS.glob("*/*.json"))
# which task each shipped folder is for; the mask ablations were run on several tasks, so try them on all
FOLDER_TASKS = {"adgen": ["adgen"], "c3": ["c3"], "ccpm": ["ccpm"], "lcqmc": ["lcqmc"], "lcsts": ["lcsts"],
                "math": ["math"], "wmt": ["wmtencn"],
                "masks": ["lcqmc", "c3", "ccpm", "math", "lcsts", "adgen", "wmtencn"]}


@pytest.fixture(scope="module")
def tok() -> FakeTokenizer:
    return FakeTokenizer()


# ---- the original's formulas, transcribed (CPM2Datasets.py as described in original-toolkit.md §6) ------------

def P(a: float, b: float) -> list[int]:
    return [-(i + 1) for i in range(int(a), int(b))]


def ratios_of(config: PromptConfig, default):
    return list(config.ratio_list) if config.ratio_list is not None else default


def ref_lcqmc(s1, s2, config, sep):
    n, (r0, r1) = config.prompt_len, ratios_of(config, [0.5, 0.5, 0])[:2]
    return P(0, r0 * n) + s1 + ([] if r1 > 0.0 else [sep]) + P(r0 * n, (r0 + r1) * n) + s2 + P((r0 + r1) * n, n)


def ref_options(numerals, choices, mark, sep):
    ids, k = [], 0
    for numeral, choice in zip(numerals, choices):
        ids += [-(k + 1), -(k + 2), -(k + 3), numeral, mark] + choice + [sep]
        k += 3
    return ids, k


def ref_c3(q, options, k, ctx, config, sep):
    n, (r0, r1, r2) = config.prompt_len, ratios_of(config, [0.5, 0.5, 0, 0])[:3]
    ids = (P(k, int(r0 * n)) + q + ([] if r1 > 0.0 else [sep]) + P(int(r0 * n), int((r0 + r1) * n)) + options
           + ([] if r2 > 0.0 else [sep]) + P(int((r0 + r1) * n), int((r0 + r1 + r2) * n)) + ctx
           + P(int((r0 + r1 + r2) * n), n))
    return ids[:768]


def ref_ccpm(options, k, translation, config, sep):
    n, (r0, r1) = config.prompt_len, ratios_of(config, [0.5, 0.5, 0, 0])[:2]
    return (P(k, int(r0 * n)) + options + ([] if r1 > 0.0 else [sep]) + P(int(r0 * n), int((r0 + r1) * n))
            + translation + P(int((r0 + r1) * n), n))


def ref_text_only(text, config):  # Math, LCSTS, WMT: r[1] is never read
    ratios = ratios_of(config, [1, 0, 0])
    n, r0, r2 = config.prompt_len, ratios[0], ratios[2]
    return P(0, int(r0 * n)) + text + P(int(r0 * n), int((r0 + r2) * n))


def ref_adgen(context, config):  # the ratio is ignored
    return P(0, config.prompt_len) + context


# ---- examples per task and their expected ids ----------------------------------------------------------------

CHOICES = ["甲乙", "丙", "丁红", "蓝"]


def case(task_name: str, tok: FakeTokenizer, config: PromptConfig):
    """(raw example, the original's ids for it under config)."""
    v, sep = tok.vocab, tok.vocab["；"]
    numerals = [v[n] for n in "一二三四"]
    options, k = ref_options(numerals, [tok.encode(c) for c in CHOICES], v["、"], sep)
    if task_name == "lcqmc":
        raw = {"id": 0, "sentence1": "天气好", "sentence2": "天气坏", "label": 1}
        return raw, ref_lcqmc(tok.encode("天气好"), tok.encode("天气坏"), config, sep)
    if task_name == "c3":
        raw = {"id": 0, "question": "他去吗?", "choices": CHOICES, "context": "男：你去吗?\n女：不去。", "label": 0}
        return raw, ref_c3(tok.encode(raw["question"]), options, k, tok.encode(raw["context"]), config, sep)
    if task_name == "ccpm":
        raw = {"id": 0, "translation": "月光", "choices": CHOICES, "label": 3}
        return raw, ref_ccpm(options, k, tok.encode("月光"), config, sep)
    if task_name == "adgen":
        raw = {"id": 0, "title": "", "tags": [], "feature": [("类型", "裤")], "desc": "写"}
        return raw, ref_adgen(tok.encode("类型") + [v["："]] + tok.encode("裤") + [sep], config)
    raws = {"math": {"id": 0, "text": "甲有3个", "target": "3+2", "equation": "x=3+2"},
            "lcsts": {"id": 0, "text": "今天新闻", "summary": "新闻"},
            "wmtencn": {"id": 0, "source_text": "good news", "target_text": "好新闻"}}
    raw = raws[task_name]
    text = raw.get("text", raw.get("source_text"))
    return raw, ref_text_only(tok.encode(text), config)


def describe(ids: list[int], sep: int) -> str:
    """Run-length view of encoder ids: P[a..b) for prompt runs, T<n> for text runs, ； for the separator."""
    runs, i = [], 0
    while i < len(ids):
        j = i + 1
        if ids[i] < 0:
            while j < len(ids) and ids[j] == ids[j - 1] - 1:
                j += 1
            runs.append(f"P[{-ids[i] - 1}..{-ids[j - 1]})")
        elif ids[i] == sep:
            runs.append("；")
        else:
            while j < len(ids) and ids[j] >= 0 and ids[j] != sep:
                j += 1
            runs.append(f"T{j - i}")
        i = j
    return " ".join(runs)


PAIRS = [(path, task) for path in ALL_CONFIGS for task in FOLDER_TASKS[path.parent.name]]


@pytest.mark.parametrize("path, task_name", PAIRS, ids=[f"{p.parent.name}/{p.stem}->{t}" for p, t in PAIRS])
def test_shipped_config_layout_matches_the_original(path, task_name, tok):
    config = PromptConfig.from_file(path)
    task = get_task(task_name)
    raw, expected = case(task_name, tok, config)
    enc_ids = task.encode(raw, tok, prompt=config)["enc_ids"]
    print(f"{path.parent.name}/{path.name} -> {task_name}: {describe(enc_ids, tok.vocab['；'])}")
    assert enc_ids == expected
    positions = [-i - 1 for i in enc_ids if i < 0]
    assert len(positions) == len(set(positions)), "a prompt position appears twice"
    assert all(0 <= p < config.prompt_len for p in positions)


def segment_counts(ids: list[int]) -> list[int]:
    """Number of prompt positions in each run of consecutive positions (text tokens split the runs too)."""
    counts, current, previous = [], 0, None
    for i in ids:
        if i < 0 and previous is not None and i == previous - 1:
            current += 1
        else:
            if current:
                counts.append(current)
            current = 1 if i < 0 else 0
        previous = i if i < 0 else None
    return counts + ([current] if current else [])


def test_c3_script_config_counts(tok):
    config = PromptConfig.from_file(CONFIGS / "c3" / "c3_33_34_33_0.json")
    raw, _ = case("c3", tok, config)
    ids = get_task("c3").encode(raw, tok, prompt=config)["enc_ids"]
    # 21 in front (P[12..33)), 34 between question and options, 3 before each of the 4 options, 33 before the text
    assert segment_counts(ids) == [21, 34, 3, 3, 3, 3, 33]
    assert describe(ids, tok.vocab["；"]).startswith("P[12..33) T4 P[33..67) P[0..3) T4 ； P[3..6)")
    assert tok.vocab["；"] not in ids[: ids.index(-1)]  # no ratio is 0 before the context: no extra ；


def test_ccpm_script_config_counts(tok):
    config = PromptConfig.from_file(CONFIGS / "ccpm" / "ccpm_10_0_0.json")
    raw, _ = case("ccpm", tok, config)
    ids = get_task("ccpm").encode(raw, tok, prompt=config)["enc_ids"]
    assert segment_counts(ids) == [88, 3, 3, 3, 3]  # 88 in front + 12 in the options
    translation = tok.encode("月光")
    assert ids[-len(translation) - 1:] == [tok.vocab["；"]] + translation  # r1 = 0: ； before the translation
    assert tok.encode("选项：")[0] not in ids  # template words dropped in prompt mode


@pytest.mark.parametrize("name, counts, separated", [
    ("lcqmc_5_5_0", [50, 50], False), ("lcqmc_10_0_0", [100], True), ("lcqmc_0_0_10", [100], True),
    ("lcqmc_0_10_0", [100], False), ("lcqmc_33_34_33", [33, 34, 33], False), ("lcqmc_99_1_0", [99, 1], False),
])
def test_lcqmc_counts_and_separator(tok, name, counts, separated):
    config = PromptConfig.from_file(CONFIGS / "lcqmc" / f"{name}.json")
    raw, _ = case("lcqmc", tok, config)
    ids = get_task("lcqmc").encode(raw, tok, prompt=config)["enc_ids"]
    assert segment_counts(ids) == counts
    assert (tok.vocab["；"] in ids) == separated
    assert tok.vocab["“"] not in ids and tok.get_sentinel_id(0) not in ids  # no template words in prompt mode


def test_text_only_tasks_ignore_the_middle_ratio(tok):
    config = PromptConfig.from_dict({"enc": {"prompt_len": 100, "ratio_list": [0.5, 0.5, 0.0]}})
    for name in ("math", "lcsts", "wmtencn"):
        raw, expected = case(name, tok, config)
        ids = get_task(name).encode(raw, tok, prompt=config)["enc_ids"]
        assert ids == expected and segment_counts(ids) == [50]  # r1 is dropped: only 50 positions are used
    math_5_0_5 = PromptConfig.from_file(CONFIGS / "math" / "math_5_0_5.json")
    raw, _ = case("math", tok, math_5_0_5)
    assert segment_counts(get_task("math").encode(raw, tok, prompt=math_5_0_5)["enc_ids"]) == [50, 50]


def test_adgen_ignores_the_ratio(tok):
    config = PromptConfig.from_dict({"enc": {"prompt_len": 100, "ratio_list": [0.0, 0.0, 1.0]}})
    raw, _ = case("adgen", tok, config)
    ids = get_task("adgen").encode(raw, tok, prompt=config)["enc_ids"]
    assert ids[:100] == prompt_ids(0, 100) and min(ids[100:]) >= 0


def test_c3_prompt_truncation_keeps_every_prompt(tok):
    config = PromptConfig.from_file(CONFIGS / "c3" / "c3_33_34_33_0.json")
    raw = {"id": 0, "question": "他去吗?", "choices": CHOICES, "context": "天气好。" * 400, "label": 0}
    ids = get_task("c3").encode(raw, tok, prompt=config)["enc_ids"]
    assert len(ids) == 768 and sorted(-i - 1 for i in ids if i < 0) == list(range(100))


def test_layout_errors(tok):
    c3, raw = get_task("c3"), case("c3", tok, PromptConfig.from_dict({"enc": {"prompt_len": 100}}))[0]
    too_few = PromptConfig.from_dict({"enc": {"prompt_len": 100, "ratio_list": [1.0]}})
    with pytest.raises(ValueError, match="has 1 entries; this task reads 3"):
        c3.encode(raw, tok, prompt=too_few)
    overlap = PromptConfig.from_dict({"enc": {"prompt_len": 100, "ratio_list": [0.05, 0.5, 0.45]}})
    with pytest.raises(ValueError, match="positions would repeat. Raise ratio_list\\[0\\] to at least 0.12"):
        c3.encode(raw, tok, prompt=overlap)


# ---- attention-mask ablations ----------------------------------------------------------------------------------

def original_masks(ids: list[int]):
    """CPM2Datasets.py: p_mask[i, j] = P(i); prompt2token = p & p.T | ~p; token2prompt = its transpose."""
    p_mask = (torch.tensor(ids) < 0).unsqueeze(1).repeat(1, len(ids))
    p2t = p_mask & p_mask.T | (~p_mask)
    return p2t, p2t.T


def test_prompt_attention_masks_match_the_original():
    ids = [-1, -2, 7, 8, -3, 9]
    p2t, t2p = original_masks(ids)
    base = {"enc": {"prompt_len": 3}}
    assert torch.equal(prompt_attention_mask(ids, PromptConfig.from_dict({**base, "mask_prompt2token": True})), p2t)
    assert torch.equal(prompt_attention_mask(ids, PromptConfig.from_dict({**base, "mask_token2prompt": True})), t2p)
    both = prompt_attention_mask(ids, PromptConfig.from_dict({**base, "mask_prompt2token": True,
                                                               "mask_token2prompt": True}))
    assert torch.equal(both, p2t & t2p)
    assert prompt_attention_mask(ids, PromptConfig.from_dict(base)).all()
    # prompts see only prompts / text sees no prompt
    assert not p2t[0, 2] and p2t[2, 0] and not t2p[2, 0] and t2p[0, 2]


def test_collate_prompt_mask_agrees(tok):
    collate = pytest.importorskip("data_utils.collate")
    ids = [-1, -2, 7, 8, -3, 9]
    for flags in ({"mask_prompt2token": True}, {"mask_token2prompt": True}):
        fn = collate.make_prompt_mask_fn(**{"mask_prompt2token": False, "mask_token2prompt": False, **flags})
        theirs = fn(torch.tensor([ids]), torch.ones(1, len(ids)))[0, 0]
        mine = prompt_attention_mask(ids, PromptConfig.from_dict({"enc": {"prompt_len": 3}, **flags}))
        assert torch.equal(theirs.bool(), mine)


def test_mask_p2t_5_5_0_quirk():
    # the file named "p2t" actually sets mask_token2prompt (kept byte-for-byte; see docs/tasks.md)
    config = PromptConfig.from_file(CONFIGS / "masks" / "mask_p2t_5_5_0.json")
    assert config.mask_token2prompt and not config.mask_prompt2token
    assert PromptConfig.from_file(CONFIGS / "masks" / "mask_p2t_10_0_0.json").mask_prompt2token


# ---- PromptConfig ----------------------------------------------------------------------------------------------

def test_all_shipped_configs_parse():
    assert len(ALL_CONFIGS) == 38
    for path in ALL_CONFIGS:
        config = PromptConfig.from_file(path)
        assert config.prompt_len == 100 and config.default_init_token == "<mask>" and config.init_tokens == ""
        assert not config.init_before_load and not config.init_from_vocab
        assert config.init_mode == ("tokens" if config.init_scratch else "checkpoint")
    tune = PromptConfig.from_file(CONFIGS / "lcqmc" / "lcqmc_model_tune_fix_prompt.json")
    assert tune.fix_prompt and not tune.fix_model and tune.ratio_list == (0.5, 0.5, 0.0)
    assert PromptConfig.from_file(CONFIGS / "math" / "math_model_tune.json").ratio_list is None


def test_shipped_configs_equal_the_originals(shared_dir):
    originals = shared_dir / "docs" / "reference" / "configs" / "prompt"
    if not originals.is_dir():
        pytest.skip(f"{originals} not found")
    theirs = sorted(p.relative_to(originals) for p in originals.glob("*/*.json"))
    assert theirs == [p.relative_to(CONFIGS) for p in ALL_CONFIGS]
    for rel in theirs:
        assert json.loads((CONFIGS / rel).read_text("utf-8")) == json.loads((originals / rel).read_text("utf-8")), rel


def test_init_token_ids(tok):
    base = {"enc": {"prompt_len": 5, "init_tokens": "", "default_init_token": "<mask>"}}
    assert PromptConfig.from_dict(base).init_token_ids(tok) == [tok.vocab["<mask>"]] * 5
    text = PromptConfig.from_dict({"enc": {**base["enc"], "init_tokens": "天气"}})
    assert text.init_token_ids(tok) == tok.encode("天气") + [tok.vocab["<mask>"]] * 3
    sample = PromptConfig.from_dict({"enc": {"prompt_len": 4, "sample_from_vocab": True}})
    big = FakeTokenizer()
    big.vocab_size = 26240
    assert sample.init_token_ids(big) == [100, 200, 300, 400]
    with pytest.raises(ValueError, match="outside the vocab"):
        sample.init_token_ids(tok)
    with pytest.raises(ValueError, match="more than prompt_len"):
        PromptConfig.from_dict({"enc": {"prompt_len": 1, "init_tokens": "天气"}}).init_token_ids(tok)
    with pytest.raises(ValueError, match="default_init_token '<nope>' is not a token"):
        PromptConfig.from_dict({"enc": {"prompt_len": 1, "default_init_token": "<nope>"}}).init_token_ids(tok)


def test_new_keys_and_validation():
    config = PromptConfig.from_dict({"init_scratch": True, "init_before_load": True, "enc": {"prompt_len": 4}})
    assert config.init_before_load and config.init_mode == "tokens"
    from_file = PromptConfig.from_dict({"init_mode": "file", "init_file": "p.pt", "enc": {"prompt_len": 4}})
    assert from_file.init_mode == "file" and from_file.init_file == "p.pt"
    assert PromptConfig.from_dict({"init_mode": "random_vocab", "enc": {"prompt_len": 4}}).init_mode == "random_vocab"
    bad = [
        ({"enc": {"prompt_len": 4}, "typo_key": 1}, "unknown prompt-config key\\(s\\) \\['typo_key'\\]; valid keys"),
        ({"enc": {"prompt_len": 4, "ratio": [1]}}, "unknown key\\(s\\) \\['ratio'\\]"),
        ({"enc": {"prompt_len": 4}, "dec": {"prompt_len": 2}}, "decoder prompts are not supported"),
        ({"enc": {"prompt_len": 0}}, "prompt_len must be > 0"),
        ({"enc": {"prompt_len": 4}, "fix_model": True, "fix_prompt": True}, "nothing to train"),
        ({"enc": {"prompt_len": 4}, "init_before_load": True}, "init_before_load needs token init"),
        ({"enc": {"prompt_len": 4}, "init_mode": "file"}, "init_file must be given"),
        ({"enc": {"prompt_len": 4}, "init_mode": "zeros"}, "not one of tokens"),
        ({"enc": {"prompt_len": 4, "ratio_list": [0.7, 0.7]}}, "sums to 1.4 > 1"),
        ({"enc": {"prompt_len": 4, "ratio_list": [2]}}, "list of numbers in \\[0, 1\\]"),
        ({"enc": {"prompt_len": 4}, "fix_model": "yes"}, "fix_model must be true or false"),
        ({}, "missing the 'enc' block"),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            PromptConfig.from_dict(data)


def test_to_dict_round_trip():
    path = CONFIGS / "lcqmc" / "lcqmc_5_5_0.json"
    assert PromptConfig.from_file(path).to_dict() == json.loads(path.read_text("utf-8"))
