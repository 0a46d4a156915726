"""The shipped launch scripts: syntax, defaults that exist, a real first step on CPU, the multi-node path."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training.helpers import (ROOT, TINY_CONFIG, env_for, free_port, make_task_dir, model_weights,
                                    train_losses)

SCRIPTS = sorted((ROOT / "scripts").rglob("*.sh"))
FULL = sorted((ROOT / "scripts" / "full_model").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_original_script_names_exist():
    names = {p.name for p in FULL}
    for task in ("lcqmc", "ccpm", "c3", "math", "lcsts", "adgen", "wmt_cn", "sogou-log"):
        assert f"finetune_cpm2_{task}.sh" in names
    prompt = {p.name for p in (ROOT / "scripts" / "prompt").glob("*.sh")}
    for task in ("lcqmc", "ccpm", "c3", "math", "lcsts", "adgen", "wmt_cn"):
        assert f"finetune_cpm2_{task}.sh" in prompt


@pytest.mark.parametrize("script", FULL, ids=lambda p: p.name)
def test_default_configs_exist(script):
    text = script.read_text()
    for var in ("DS_CONFIG", "CONFIG_PATH"):
        m = re.search(rf'{var}="\$\{{{var}:-\$\{{WORKING_DIR\}}/([^}}"]+)\}}"', text)
        assert m, f"{script.name} sets no default {var}"
        assert (ROOT / m.group(1)).is_file(), f"{script.name}: {m.group(1)} does not exist"


def _script_env(data: Path, vocab: Path, save: Path, extra: str, **more) -> dict:
    return env_for(CONFIG_PATH=str(TINY_CONFIG), TOKENIZER_PATH=str(vocab), DATA_PATH=str(data), CKPT_PATH="none",
                   SAVE_PATH=str(save), MASTER_PORT=str(free_port()), EXTRA_ARGS=extra, PYTHON=os.sys.executable,
                   **more)


def test_full_model_lcqmc_script_first_steps_on_cpu(tmp_path):
    data, vocab = make_task_dir(tmp_path)
    save = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "full_model" / "finetune_cpm2_lcqmc.sh")],
                          env=_script_env(data, vocab, save, "--train-iters 2 --eval-interval 2 --num-workers 0 "
                                          "--batch-size 4 --eval-batch-size 16 --log-interval 1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("[cpm2] CPU mode") and "fp32" in first
    assert [s for s, _ in train_losses(save)] == [1, 2]
    assert json.loads((save / "test" / "metrics.json").read_text())["num_examples"] == 16
    assert (save / "log.txt").is_file() and (save / "train_log").is_file()


def test_multi_node_launch_on_one_machine(tmp_path):
    """Two deepspeed launchers (--no_ssh, node_rank 0 and 1) over a two-line hostfile, one CPU process per node,
    agree on the loss of one process with the same global batch."""
    data, vocab = make_task_dir(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    save = tmp_path / "two_nodes"
    port = str(free_port())
    extra = "--train-iters 2 --num-workers 0 --batch-size 4 --log-interval 1 --seed 7 --lr 3e-3"
    env = _script_env(data, vocab, save, extra, NUM_WORKERS="2", NUM_GPUS_PER_WORKER="1", HOST_FILE=str(hostfile))
    env["MASTER_PORT"] = port
    env["EXTRA_ARGS"] = extra + " --do-train"
    procs = []
    for node in (0, 1):
        node_env = dict(env, NODE_RANK=str(node),
                        LAUNCHER_ARGS=f"--no_ssh --node_rank {node} --master_addr 127.0.0.1")
        procs.append(subprocess.Popen(["bash", str(ROOT / "scripts" / "full_model" / "finetune_cpm2_lcqmc.sh")],
                                      env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "world 2 = MP 1 x DP 2" in outs[0]
    one = tmp_path / "one"
    from tests.training.helpers import base_args, run_finetune

    run_finetune(base_args(data, vocab, one, "--do-train", "--random-init", "--train-iters", "2", "--batch-size", "8",
                           "--log-interval", "1", "--seed", "7", "--lr", "3e-3"))
    for (s1, a), (s2, b) in zip(train_losses(one), train_losses(save)):
        assert s1 == s2 and abs(a - b) < 1e-5


def test_finetune_from_released_mp4_checkpoint(tmp_path):
    """Weights saved as released-style MP-4 fp16 shards, fine-tuned at MP 1: training starts from them (the
    result stays close to the loaded weights), never from a random init."""
    from model.sharding import split_full  # noqa: F401  (the fixture writes with the same split rules)
    from tests.model.checkpoint_fixtures import write_released_shards
    from tests.training.helpers import base_args, run_finetune

    data, vocab = make_task_dir(tmp_path)
    vocab_size = sum(1 for _ in open(vocab / "vocab.txt", encoding="utf-8"))
    from model import EncDecConfig, EncDecModel

    cfg = EncDecConfig.from_json_file(str(TINY_CONFIG))
    cfg.vocab_size = vocab_size
    torch.manual_seed(123)
    src = EncDecModel(cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    loaded = {k: v.to(torch.float16).float() for k, v in src.state_dict().items()}
    ckpt = tmp_path / "released"
    write_released_shards(loaded, ckpt, 4)
    save = tmp_path / "ft"
    run_finetune(base_args(data, vocab, save, "--do-train", "--load", str(ckpt), "--train-iters", "2",
                           "--batch-size", "8", "--lr", "1e-3", "--seed", "1234"))
    after = model_weights(save / "checkpoints")
    torch.manual_seed(1234)
    random_init = EncDecModel(cfg).state_dict()
    moved = max((after[k] - loaded[k]).abs().max().item() for k in loaded)
    from_random = min((after[k] - random_init[k]).abs().max().item() for k in loaded if "layer_norm" not in k)
    assert 0 < moved < 0.01, moved          # trained (changed) and close to the loaded weights
    assert from_random > 0.05, from_random  # nowhere near a random init
