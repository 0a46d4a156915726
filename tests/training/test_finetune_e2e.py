"""End-to-end runs of finetune_cpm2.py on the tiny model (subprocesses, CPU, gloo)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.helpers import (ROOT, base_args, env_for, make_task_dir, model_weights, run_finetune,
                                    train_losses)

TRAIN = ["--do-train", "--random-init", "--batch-size", "8", "--lr", "3e-3", "--log-interval", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"))


def test_train_eval_predict_and_reload(task, tmp_path):
    data, vocab = task
    save = tmp_path / "run"
    run_finetune(base_args(data, vocab, save, *TRAIN, "--do-valid", "--do-eval", "--epochs", "2",
                           "--eval-interval", "4", "--save-interval", "4"))
    losses = [loss for _, loss in train_losses(save)]
    assert len(losses) == 16 and losses[-1] < losses[0]
    for split, n in (("dev", 16), ("test", 16)):
        preds = [json.loads(line) for line in open(save / split / "predictions.jsonl", encoding="utf-8")]
        metrics = json.loads((save / split / "metrics.json").read_text())
        assert len(preds) == n and metrics["num_examples"] == n
        # metrics.json agrees with an independent recount from predictions.jsonl
        acc = sum(p["prediction"] == p["reference"] for p in preds) / n
        assert metrics["accuracy"] == pytest.approx(acc)
        assert {p["prediction"] for p in preds} <= {"相似", "矛盾"}
    best = json.loads((save / "best" / "best.json").read_text())
    assert best["entries"] and (save / "tensorboard").is_dir()
    # --load takes the best checkpoint back: evaluating it reproduces the dev metric recorded for it
    again = tmp_path / "again"
    run_finetune(base_args(data, vocab, again, "--load", str(save / "best"), "--do-valid"))
    dev_again = json.loads((again / "dev" / "metrics.json").read_text())
    assert dev_again["accuracy"] == pytest.approx(best["entries"][0]["value"])


RESUMABLE = [*TRAIN, "--do-valid", "--epochs", "2", "--eval-interval", "3", "--save-interval", "2"]


@pytest.fixture(scope="module")
def uninterrupted(task, tmp_path_factory):
    data, vocab = task
    save = tmp_path_factory.mktemp("uninterrupted")
    run_finetune(base_args(data, vocab, save, *RESUMABLE))
    return save


@pytest.mark.parametrize("fault", ["step:5", "eval:2", "save:2"])
def test_sigkill_then_resume_is_bit_identical(task, tmp_path, uninterrupted, fault):
    """Killed (SIGKILL) during a step, an evaluation or a checkpoint write, then --resume: the finished run equals
    the uninterrupted one bit for bit (weights, dev metrics, best-k list)."""
    data, vocab = task
    ref = uninterrupted
    save = tmp_path / "killed"
    args = base_args(data, vocab, save, *RESUMABLE, "--resume")
    killed = run_finetune(args, env=env_for(CPM2_FAULT=fault), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_finetune(args)
    want, got = model_weights(ref / "checkpoints"), model_weights(save / "checkpoints")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    ref_dev = json.loads((ref / "dev" / "metrics.json").read_text())
    got_dev = json.loads((save / "dev" / "metrics.json").read_text())
    assert got_dev == ref_dev
    assert json.loads((save / "best" / "best.json").read_text()) == json.loads((ref / "best" / "best.json").read_text())


def test_model_parallel_and_data_parallel_match_one_process(task, tmp_path):
    """MP 2 and DP 2 (gloo, two processes) follow the loss curve of one process with the same global batch.

    A small --clip-grad makes every step clip, so the gradient norm (training/grad_clip.py: split weights summed
    over the MP ranks, replicated ones counted once) must agree across layouts too."""
    data, vocab = task
    common = [*TRAIN, "--train-iters", "4", "--clip-grad", "0.05"]
    one = tmp_path / "one"
    run_finetune(base_args(data, vocab, one, *common))
    mp2 = tmp_path / "mp2"
    run_finetune(base_args(data, vocab, mp2, *common, "--model-parallel-size", "2"), nproc=2)
    dp2 = tmp_path / "dp2"
    run_finetune(base_args(data, vocab, dp2, *[a if a != "8" else "4" for a in common]), nproc=2)
    ref = train_losses(one)
    for other in (mp2, dp2):
        got = train_losses(other)
        assert [s for s, _ in got] == [s for s, _ in ref]
        for (_, a), (_, b) in zip(ref, got):
            assert abs(a - b) < 1e-5, (other.name, ref, got)


def test_bad_flags_fail_before_any_work(task, tmp_path):
    data, vocab = task
    proc = run_finetune(base_args(data, vocab, tmp_path / "x", "--do-train"), check=False)
    assert proc.returncode == 2 and "--random-init" in proc.stderr
    proc = run_finetune(base_args(data, vocab, tmp_path / "x", "--do-train", "--random-init", "--fp16", "--bf16"),
                        check=False)
    assert proc.returncode == 2 and "exclusive" in proc.stderr
    proc = run_finetune(base_args(data, vocab, tmp_path / "x", "--do-train", "--random-init", "--no-such-flag"),
                        check=False)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_do_infer_writes_predictions_for_unlabelled_data(task, tmp_path):
    """--do-infer reads the `infer` split (no labels), predicts with the loaded weights and writes predictions."""
    data, vocab = task
    infer_dir = tmp_path / "data"
    infer_dir.mkdir()
    rows = [json.loads(line) for line in open(data / "test.jsonl", encoding="utf-8")][:5]
    with open(infer_dir / "infer.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"sentence1": r["sentence1"], "sentence2": r["sentence2"]}, ensure_ascii=False) + "\n")
    save = tmp_path / "infer"
    run_finetune(base_args(infer_dir, vocab, save, "--random-init", "--do-infer"))
    preds = [json.loads(line) for line in open(save / "infer" / "predictions.jsonl", encoding="utf-8")]
    assert len(preds) == 5 and all(p["reference"] is None for p in preds)
    assert {p["prediction"] for p in preds} <= {"相似", "矛盾"}
    assert json.loads((save / "infer" / "metrics.json").read_text())["num_examples"] == 5


def test_zero1_dev_metric_matches_the_saved_weights(task, tmp_path):
    """Regression: DeepSpeed's ZeRO optimizers write updated weights through `.data` views of a flat buffer
    (no `_version` bump), and a oneDNN packed-weight cache that outlived one evaluation once served the weights of
    the first evaluation to every later one: the dev metric logged at a step did not belong to that step's weights.
    The final dev evaluation (after earlier ones) must equal a fresh evaluation of the final checkpoint."""
    data, vocab = task
    save = tmp_path / "zero1"
    ds = str(ROOT / "configs" / "deepspeed" / "ds_full_model.json")  # ZeRO stage 1, as the shipped scripts
    run_finetune(base_args(data, vocab, save, *TRAIN, "--do-valid", "--deepspeed_config", ds, "--epochs", "2",
                           "--eval-interval", "4", "--save-interval", "100"))
    logged = [json.loads(line) for line in open(save / "metrics.jsonl", encoding="utf-8") if '"dev"' in line]
    assert len(logged) >= 2 and logged[-1]["step"] == 16
    again = tmp_path / "again"
    run_finetune(base_args(data, vocab, again, "--load", str(save / "checkpoints"), "--do-valid"))
    reloaded = json.loads((again / "dev" / "metrics.json").read_text())
    assert reloaded["accuracy"] == logged[-1]["accuracy"]
    assert reloaded["loss"] == pytest.approx(logged[-1]["loss"], rel=1e-5)
