"""ZeRO stages 0/1/2 x fp32/bf16 through the training code path, and fp16 (GPU only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.helpers import env_for

WORKER = Path(__file__).with_name("zero_matrix_worker.py")


def test_zero_stages_and_precisions_train():
    proc = subprocess.run([sys.executable, str(WORKER)], env=env_for(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert set(results) == {f"zero{s}-{p}" for s in (0, 1, 2) for p in ("fp32", "bf16")}
    for name, losses in results.items():
        assert all(l == l for l in losses), name  # finite
        assert losses[-1] < losses[0] - 0.05, (name, losses)
    # ZeRO partitions the optimizer state, not the arithmetic: fp32 curves agree across stages.
    for stage in (1, 2):
        for a, b in zip(results["zero0-fp32"], results[f"zero{stage}-fp32"]):
            assert abs(a - b) < 1e-4, (stage, results)


@pytest.mark.parametrize("zero", [{"stage": 3}, 3])
def test_zero_stage_3_is_refused_with_the_reason(tmp_path, zero):
    from training.engine import OptimSettings, build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    s = OptimSettings(lr=1e-3, weight_decay=0.0, clip_grad=1.0, micro_batch_size=2, grad_acc_steps=1, dp_size=1,
                      fp16=False, bf16=False, warmup_steps=0, decay_steps=10, decay_style="constant")
    with pytest.raises(ValueError, match="ZeRO stage 3; the toolkit runs stages 0, 1 and 2"):
        build_ds_config(str(path), s)
    for accepted in ({"stage": 2}, True, False):  # old DeepSpeed configs wrote a bool (true = stage 1)
        path.write_text(json.dumps({"zero_optimization": accepted}))
        assert build_ds_config(str(path), s)["zero_optimization"] == accepted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs a GPU: DeepSpeed's CPU accelerator "
                                                          "refuses fp16 ('Type fp16 is not supported on your device')")
def test_fp16_trains_on_gpu(tmp_path):
    from tests.training.helpers import base_args, make_task_dir, run_finetune, train_losses

    data, vocab = make_task_dir(tmp_path)
    save = tmp_path / "fp16"
    run_finetune(base_args(data, vocab, save, "--do-train", "--random-init", "--fp16", "--batch-size", "8",
                           "--train-iters", "6", "--log-interval", "1", "--lr", "3e-3"))
    losses = [l for _, l in train_losses(save)]
    assert losses[-1] < losses[0]
