"""scripts/prompt/*.sh: their default DeepSpeed and prompt configs exist, their learning rates are the original's,
and they run: lcqmc for two steps in the default suite, the other six on small hand-made fixtures (slow)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.prompt.common import make_base_checkpoint, make_prompt_task, metrics
from tests.training.helpers import ROOT, TINY_CONFIG, env_for, free_port, train_losses

SCRIPTS = {p.stem.removeprefix("finetune_cpm2_"): p for p in sorted((ROOT / "scripts" / "prompt").glob("*.sh"))}
# The original scripts' learning rates (original-toolkit.md §5.4).
ORIGINAL_LR = {"lcqmc": 0.005, "adgen": 0.005, "ccpm": 0.05, "c3": 0.1, "math": 0.1, "lcsts": 0.1, "wmt_cn": 0.02}


def default(text: str, var: str) -> str:
    """The default of `VAR="${VAR:-DEFAULT}"` (or the positional form `VAR="${N:-${VAR:-DEFAULT}}"`)."""
    m = re.search(rf'^{var}="\$\{{(?:\d:-\$\{{)?{var}:-(.*?)\}}\}}?"$', text, re.M)
    assert m, f"no default for {var}"
    return m.group(1)


def resolve(text: str, value: str) -> Path:
    pos = default(text, "POS") if "${POS" in value else ""
    value = value.replace("${WORKING_DIR}", str(ROOT)).replace("${POS}", pos)
    assert "$" not in value, value
    return Path(value)


def test_every_prompt_script_points_at_configs_that_exist():
    assert set(SCRIPTS) == set(ORIGINAL_LR)
    for name, script in SCRIPTS.items():
        text = script.read_text()
        for var in ("DS_CONFIG", "PROMPT_CONFIG", "CONFIG_PATH"):
            path = resolve(text, default(text, var))
            assert path.is_file(), f"{script.name}: {var} default {path} does not exist"
        assert float(default(text, "LR")) == ORIGINAL_LR[name], script.name
        assert "--prompt-tune" in text and '--prompt-config "${PROMPT_CONFIG}"' in text
        ds = json.loads(resolve(text, default(text, "DS_CONFIG")).read_text())
        assert "optimizer" not in ds and "scheduler" not in ds  # the toolkit passes its own (engine.py)


def run_script(name: str, data: Path, vocab: Path, save: Path, ckpt: str, extra: str) -> subprocess.CompletedProcess:
    env = env_for(CONFIG_PATH=str(TINY_CONFIG), TOKENIZER_PATH=str(vocab), DATA_PATH=str(data), CKPT_PATH=ckpt,
                  SAVE_PATH=str(save), MASTER_PORT=str(free_port()), PYTHON=os.sys.executable,
                  EXTRA_ARGS=f"--num-workers 0 --batch-size 4 --eval-batch-size 8 --log-interval 1 {extra}")
    proc = subprocess.run(["bash", str(SCRIPTS[name])], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_lcqmc_prompt_script_first_steps_on_cpu(tmp_path):
    data, vocab = make_prompt_task(tmp_path, train=16, dev=8, test=8)
    base = make_base_checkpoint(vocab, tmp_path / "base")
    save = tmp_path / "run"
    proc = run_script("lcqmc", data, vocab, save, str(base), "--train-iters 2 --eval-interval 2")
    assert proc.stdout.splitlines()[0].startswith("[cpm2] CPU mode")
    assert [s for s, _ in train_losses(save)] == [1, 2]
    assert metrics(save, "test")["num_examples"] == 8
    log = (save / "log.txt").read_text() if (save / "log.txt").exists() else proc.stdout
    assert "6,400 trainable" in log
    assert json.loads((save / "best" / "prompt_config.json").read_text())["enc"]["ratio_list"] == [0.5, 0.5, 0.0]


# ---- the other six tasks, on hand-made fixtures in the CPM-2 layout ------------------------------------------------

def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


N = 16  # per split: >= two micro-batches of 4 (lcsts keeps half, --train-ratio 0.5), the scripts use grad acc 2
NUMS = "一二三四五六七八九十百千万亿零两"

FIXTURES = {
    "ccpm": (".jsonl", lambda: _jsonl([
        {"translation": f"春天的花开满了{NUMS[i]}座山坡", "choices": ["春风吹绿江南岸", "秋月照寒山", "夏日荷花红", "冬雪压青松"],
         "answer": i % 4} for i in range(N)])),
    "c3": (".json", lambda: json.dumps([
        [[f"小明今天第{NUMS[i]}次去学校上课。", "他很高兴。"],
         [{"question": "小明去哪里了？", "choice": ["学校", "医院", "公园"], "answer": "学校"}], f"doc{i}"]
        for i in range(N)], ensure_ascii=False)),
    "math": (".json", lambda: json.dumps([{"text": f"小明有{i + 2}个苹果，又买了3个，一共有多少个？",
                                           "equation": f"x={i + 2}+3"} for i in range(N)], ensure_ascii=False)),
    "lcsts": (".jsonl", lambda: _jsonl([{"text": f"今天上午，市政府召开第{NUMS[i]}次新闻发布会，介绍了城市交通建设的最新进展。",
                                         "summary": f"城市交通建设取得第{NUMS[i]}项新进展"} for i in range(N)])),
    "adgen": (".json", lambda: _jsonl([{"title": "连衣裙", "feature": [["类型", "裙"], ["颜色", f"{NUMS[i]}号红色"]],
                                        "desc": f"这款{NUMS[i]}号红色连衣裙简约大方"} for i in range(N)])),
    "wmt_cn": (".json", lambda: json.dumps([{"source": f"今天天气很好，第{i}天。", "target": f"The weather is nice on day {i}.",
                                             "index": i} for i in range(N)], ensure_ascii=False)),
}


def write_fixture_task(fixture, data: Path, *, vocab_file: Path) -> tuple[Path, Path]:
    """train/dev/test files of one FIXTURES entry under `data`; returns (data dir, vocab dir)."""
    ext, make = fixture
    data.mkdir()
    for split in ("train", "dev", "test"):
        (data / f"{split}{ext}").write_text(make(), encoding="utf-8")
    return data, vocab_file.parent


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_other_prompt_scripts_first_steps_on_cpu(name, tmp_path, cn_vocab, cn_en_vocab):
    """Each script on the tiny model with its task's real vocab (../shared), two steps, then test decoding."""
    data, vocab = write_fixture_task(FIXTURES[name], tmp_path / "data",
                                     vocab_file=cn_en_vocab if name == "wmt_cn" else cn_vocab)
    save = tmp_path / "run"
    run_script(name, data, vocab, save, "none", "--train-iters 2 --eval-interval 2 --out-seq-length 4")
    assert [s for s, _ in train_losses(save)] == [1, 2]
    assert metrics(save, "test")["num_examples"] == N
    assert (save / "best" / "base_checkpoint.json").is_file()
