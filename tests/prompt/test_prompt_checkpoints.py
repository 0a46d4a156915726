"""Prompt-only checkpoints (fix_model): small, self-describing, reloadable on top of the base, resumable (and only
with the same base), and the same prompt at MP 1 and MP 2."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.prompt.common import (PROMPT_LEN, make_base_checkpoint, make_prompt_task, metrics, predictions, same_metrics,
                                 prompt_config, saved_prompt, write_json)
from tests.training.helpers import base_args, env_for, run_finetune

PROMPT_KEY = "encoder.prompt_embeds.weight"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_ckpt")
    data, vocab = make_prompt_task(root)
    base = make_base_checkpoint(vocab, root / "base")
    cfg = write_json(root / "lcqmc_10.json", prompt_config())
    return data, vocab, base, cfg


def train_args(base, cfg, *extra):
    return ["--load", str(base), "--prompt-tune", "--prompt-config", str(cfg), "--do-train", "--do-valid",
            "--do-eval", "--batch-size", "8", "--lr", "0.05", "--train-iters", "4", "--eval-interval", "2",
            "--save-interval", "2", "--log-interval", "1", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    data, vocab, base, cfg = task
    save = tmp_path_factory.mktemp("reference")
    run_finetune(base_args(data, vocab, save, *train_args(base, cfg)))
    return save


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoint_holds_prompt_optimizer_and_config_and_is_tiny(task, reference):
    data, vocab, base, cfg = task
    base_bytes = dir_bytes(base / "1000")
    best_step = json.loads((reference / "best" / "best.json").read_text())["entries"][0]["step"]
    best_file = reference / "best" / str(best_step) / "mp_rank_00_model_states.pt"
    states = torch.load(best_file, map_location="cpu", weights_only=True)
    assert list(states["module"]) == [PROMPT_KEY] and states["module"][PROMPT_KEY].shape == (PROMPT_LEN, 64)
    ratio = best_file.stat().st_size / base_bytes
    assert ratio < 0.01, (best_file.stat().st_size, base_bytes)

    # The resume checkpoint: DeepSpeed's files without the frozen weights, with the prompt's Adam state.
    step_dir = reference / "checkpoints" / "4"
    ds = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert list(ds["module"]) == [PROMPT_KEY]
    opt_state = ds["optimizer"]["state"] if ds.get("optimizer") else None
    if opt_state is None:  # ZeRO keeps it in its own files
        opt_files = list(step_dir.glob("*optim_states.pt"))
        assert opt_files
    else:
        assert {tuple(s["exp_avg"].shape) for s in opt_state.values()} == {(PROMPT_LEN, 64)}
    assert dir_bytes(step_dir) < 0.1 * base_bytes, dir_bytes(step_dir)  # tens of KB, mostly fixed overhead

    for where in (reference / "best", reference / "checkpoints"):
        assert json.loads((where / "prompt_config.json").read_text()) == json.loads(cfg.read_text())
        pointer = json.loads((where / "base_checkpoint.json").read_text())
        assert pointer == {"load": os.path.abspath(base), "seed": 3}


def test_load_base_plus_prompt_reproduces_the_evaluation(task, reference, tmp_path):
    """`--load BASE --load-prompt SAVE/best` is the tuned model: same test loss (logits) and predictions."""
    data, vocab, base, cfg = task
    again = tmp_path / "again"
    run_finetune(base_args(data, vocab, again, "--load", str(base), "--prompt-tune", "--prompt-config", str(cfg),
                           "--load-prompt", str(reference / "best"), "--do-eval", "--do-valid"))
    assert same_metrics(metrics(again, "test"), metrics(reference, "test"))
    assert predictions(again, "test") == predictions(reference, "test")


def test_resume_needs_the_same_base_and_is_exact(task, reference, tmp_path):
    data, vocab, base, cfg = task
    save = tmp_path / "killed"
    killed = run_finetune(base_args(data, vocab, save, *train_args(base, cfg, "--resume")),
                          env=env_for(CPM2_FAULT="step:3"), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]

    # Without the base (or with another one) resuming would put the prompt on the wrong frozen model: refused.
    args = train_args(base, cfg, "--resume")
    no_base = [a for a in args if a not in ("--load", str(base))] + ["--random-init"]
    proc = run_finetune(base_args(data, vocab, save, *no_base), check=False)
    assert proc.returncode == 2 and f"pass --load {os.path.abspath(base)}" in proc.stderr, proc.stderr[-2000:]
    other = make_base_checkpoint(vocab, tmp_path / "other_base", seed=1)
    proc = run_finetune(base_args(data, vocab, save, *[str(other) if a == str(base) else a for a in args]),
                        check=False)
    assert proc.returncode == 2 and "was trained on --load" in proc.stderr, proc.stderr[-2000:]

    run_finetune(base_args(data, vocab, save, *args))
    assert torch.equal(saved_prompt(save / "checkpoints"), saved_prompt(reference / "checkpoints"))
    for split in ("dev", "test"):
        assert metrics(save, split) == metrics(reference, split)
    assert (json.loads((save / "best" / "best.json").read_text())
            == json.loads((reference / "best" / "best.json").read_text()))


def test_prompt_trained_at_mp2_matches_mp1(task, reference, tmp_path):
    """The prompt is replicated and its gradient identical on every MP rank: MP 2 (two processes) trains the same
    prompt as one process."""
    data, vocab, base, cfg = task
    mp2 = tmp_path / "mp2"
    run_finetune(base_args(data, vocab, mp2, *train_args(base, cfg, "--model-parallel-size", "2")), nproc=2)
    one, two = saved_prompt(reference / "checkpoints"), saved_prompt(mp2 / "checkpoints")
    from tokenization_enc_dec import load_tokenizer
    from tests.training.helpers import model_weights

    init = model_weights(base)["word_embeds.weight"][load_tokenizer(str(vocab)).token_to_id("<mask>")]
    assert (one - init).abs().max() > 0.05  # it trained
    assert (one - two).abs().max() < 1e-5
    assert (saved_prompt(reference / "best") - saved_prompt(mp2 / "best")).abs().max() < 1e-5
