"""Non-finite losses: fp32/bf16 stop at once with the last good state saved; fp16 skips the step with the loss
scale lowered (logged) and stops after --max-nonfinite-steps in a row; every data-parallel rank decides alike.

The loop logic runs in-process against `FakeEngine` (DeepSpeed's skip-and-rescale behaviour); one CPU
subprocess checks the real DeepSpeed fp32 path end to end. The real fp16 paths need a GPU (DeepSpeed's CPU
accelerator refuses fp16) and are marked `gpu`. That the fp16 FFN stays finite where a naive one overflows is
`tests/model/test_modeling.py::test_fp16_feed_forward_stays_finite`.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from model.checkpoint import load_shard
from tests.training.helpers import base_args, env_for, make_task_dir, model_weights, run_finetune

from . import project_module
from .fakes import make_trainer

faults = project_module("training.faults")
loop = project_module("training.loop")
NonFiniteLossError = loop.NonFiniteLossError
latest_step = project_module("training.state").latest_step


def _saved_state(save_dir):
    step = latest_step(str(save_dir))
    step_dir = save_dir / "checkpoints" / str(step)
    module = load_shard(step_dir / "mp_rank_00_model_states.pt")["module"]
    return step, module, json.loads((step_dir / "trainer_state.json").read_text())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- fault hook

def test_nan_fault_spec(monkeypatch):
    loss = torch.tensor(2.0)
    monkeypatch.delenv("CPM2_FAULT", raising=False)
    assert faults.maybe_poison_loss(loss, 3) is loss
    monkeypatch.setenv("CPM2_FAULT", "nan:3:2")
    assert [bool(torch.isnan(faults.maybe_poison_loss(loss, s))) for s in (2, 3, 4, 5)] == [False, True, True, False]
    monkeypatch.setenv("CPM2_FAULT_RANK", "1")  # another rank's fault
    assert not torch.isnan(faults.maybe_poison_loss(loss, 3))
    monkeypatch.setenv("CPM2_FAULT", "step:3")
    monkeypatch.delenv("CPM2_FAULT_RANK")
    assert faults.maybe_poison_loss(loss, 3) is loss


# ---------------------------------------------------------------- fp32 / bf16: stop at once

def test_fp32_nonfinite_loss_stops_at_once_and_saves_the_last_good_state(tmp_path, monkeypatch):
    """bf16 takes the same path (the loop distinguishes fp16 only): no step is skipped silently."""
    monkeypatch.setenv("CPM2_FAULT", "nan:3")
    trainer, engine = make_trainer(tmp_path, steps=6)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 3 \(1 step\(s\) in a row.*last good state "
                                                 r"\(step 2\) is saved in .*checkpoints"):
        trainer.train()
    assert len(engine.applied) == 2  # the bad update was never applied
    step, module, state = _saved_state(tmp_path)
    assert step == 2 and state["global_step"] == 2
    assert _equal(module, engine.applied[-1])  # the weights after step 2, i.e. before the bad step
    assert _equal(trainer.model.state_dict(), engine.applied[-1])


def test_one_rank_nonfinite_stops_every_rank(tmp_path, monkeypatch):
    """The decision uses the data-parallel mean: a NaN on another rank stops this one too (here the other rank's
    NaN arrives through the all-reduce, stubbed), so no rank steps into a collective the others never join."""
    trainer, engine = make_trainer(tmp_path, steps=4, log_interval=100)  # only _check_finite all-reduces
    real_mean = loop._mean_over_data_parallel
    calls = {"n": 0}

    def mean_with_a_nan_peer(value):
        calls["n"] += 1
        return value * float("nan") if calls["n"] == 2 else real_mean(value)

    monkeypatch.setattr(loop, "_mean_over_data_parallel", mean_with_a_nan_peer)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train()
    assert len(engine.applied) == 1 and latest_step(str(tmp_path)) == 1


# ---------------------------------------------------------------- fp16: skip, lower the scale, log; stop after N

def test_fp16_overflow_skips_steps_with_lower_scale_and_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CPM2_FAULT", "nan:2:3")
    trainer, engine = make_trainer(tmp_path, steps=6, fp16=True, max_nonfinite_steps=5)
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        trainer.train()
    assert engine.skipped_steps == 3 and engine.optimizer.cur_scale == 2.0 ** 13
    assert len(engine.applied) == 3 and trainer.global_step == 6 and trainer.nonfinite_streak == 0
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss (fp16 overflow)" in r.getMessage()]
    assert [w.split(":")[0] for w in warnings] == ["step 2", "step 3", "step 4"]
    assert "loss scale now 16384" in warnings[1] and "loss scale now 8192" in warnings[2] and "(3 in a row of at most 5)" in warnings[2]
    # the skipped steps left the weights alone: step 5 starts from the weights of step 1
    train_rows = [values for _, split, values in trainer.sink.rows if split == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows if r)


def test_fp16_stops_after_max_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("CPM2_FAULT", "nan:2:10")
    trainer, engine = make_trainer(tmp_path, steps=12, fp16=True, max_nonfinite_steps=4)
    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(4 step\(s\) in a row, --max-nonfinite-steps 4\)"):
        trainer.train()
    step, module, state = _saved_state(tmp_path)
    # global_step counts the skipped steps too (DeepSpeed's step counter moves on); the weights are step 1's
    assert step == state["global_step"] == 4 and state["nonfinite_streak"] == 4
    assert len(engine.applied) == 1 and _equal(module, engine.applied[0])


def test_fp16_gradient_overflow_with_finite_loss_is_logged(tmp_path, caplog):
    trainer, engine = make_trainer(tmp_path, steps=3, fp16=True)
    real_step = engine.step

    def overflow_on_second(*a):
        if engine.micro_steps == 1:  # DeepSpeed found inf in the gradients although the loss was finite
            engine.micro_steps += 1
            engine.skipped_steps += 1
            engine.optimizer.cur_scale /= 2
            engine.opt.zero_grad(set_to_none=True)
            return
        real_step(*a)

    engine.step = overflow_on_second
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        trainer.train()
    assert "step 2: fp16 gradient overflow, update skipped, loss scale now 32768" in caplog.text


# ---------------------------------------------------------------- the real DeepSpeed fp32 path (CPU subprocess)

TRAIN = ["--do-train", "--random-init", "--batch-size", "8", "--lr", "3e-3", "--log-interval", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"), train=32, dev=8, test=8)


def test_finetune_stops_on_nan_with_the_weights_before_the_bad_step(task, tmp_path):
    """finetune_cpm2.py, fp32, the loss made NaN at step 3: exit 2 with the message, and the resume checkpoint
    holds exactly the weights after step 2 (recorded independently by the best-checkpoint save at step 2)."""
    data, vocab = task
    save = tmp_path / "run"
    proc = run_finetune(base_args(data, vocab, save, *TRAIN, "--train-iters", "4", "--do-valid", "--eval-interval",
                                  "2", "--save-interval", "100"), env=env_for(CPM2_FAULT="nan:3"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loss is non-finite at step 3" in proc.stderr and "last good state (step 2)" in proc.stderr
    assert latest_step(str(save)) == 2
    assert json.loads((save / "best" / "best.json").read_text())["entries"][0]["step"] == 2
    assert _equal(model_weights(save / "checkpoints"), model_weights(save / "best"))


# ---------------------------------------------------------------- GPU only: DeepSpeed's fp16 loss scaler

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="fp16 needs a GPU: DeepSpeed's CPU accelerator refuses fp16")


def _gpu_env(**extra):
    env = env_for(**extra)
    env.pop("DS_ACCELERATOR", None)
    return env


@pytest.mark.gpu
@needs_gpu
def test_fp16_overflow_is_skipped_and_logged_on_gpu(task, tmp_path):
    data, vocab = task
    save = tmp_path / "run"
    proc = run_finetune(base_args(data, vocab, save, *TRAIN, "--fp16", "--train-iters", "4"),
                        env=_gpu_env(CPM2_FAULT="nan:2"), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2: non-finite loss (fp16 overflow), update skipped, loss scale now" in proc.stdout


@pytest.mark.gpu
@needs_gpu
def test_fp16_stops_after_max_nonfinite_steps_on_gpu(task, tmp_path):
    data, vocab = task
    save = tmp_path / "run"
    proc = run_finetune(base_args(data, vocab, save, *TRAIN, "--fp16", "--train-iters", "8",
                                  "--max-nonfinite-steps", "3"), env=_gpu_env(CPM2_FAULT="nan:2:100"), check=False)
    assert proc.returncode == 2 and "non-finite at step 4 (3 step(s) in a row" in proc.stderr
    assert latest_step(str(save)) == 3
