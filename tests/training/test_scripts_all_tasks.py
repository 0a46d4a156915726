"""Every full-model script runs its first steps on the tiny model in CPU mode (slow: one launcher per task).

The data are small hand-made files in each task's CPM-2 layout (shared with the prompt-script tests); the vocab is
the task's real one from ../shared (skipped with the reason when absent).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.prompt.test_prompt_scripts import FIXTURES, _jsonl, write_fixture_task
from tests.training.helpers import ROOT, TINY_CONFIG, env_for, free_port, train_losses

SOGOU = (".json", lambda: _jsonl([{"query": "北京天气", "pos_doc": "北京今天晴天", "neg_doc": "上海的美食"}
                                  for _ in range(4)]))
TASKS = {**FIXTURES, "sogou-log": SOGOU}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_full_model_script_first_steps_on_cpu(name, tmp_path, cn_vocab, cn_en_vocab):
    data, vocab = write_fixture_task(TASKS[name], tmp_path / "data",
                                     vocab_file=cn_en_vocab if name == "wmt_cn" else cn_vocab)
    save = tmp_path / "run"
    env = env_for(CONFIG_PATH=str(TINY_CONFIG), TOKENIZER_PATH=str(vocab), DATA_PATH=str(data), CKPT_PATH="none",
                  SAVE_PATH=str(save), MASTER_PORT=str(free_port()),
                  EXTRA_ARGS="--train-iters 2 --eval-interval 2 --log-interval 1 --num-workers 0 --batch-size 2 "
                             "--gradient-accumulation-steps 1 --eval-batch-size 4 --out-seq-length 4")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "full_model" / f"finetune_cpm2_{name}.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s for s, _ in train_losses(save)] == [1, 2]
    assert json.loads((save / "test" / "metrics.json").read_text())["num_examples"] >= 1
