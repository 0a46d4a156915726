"""A finished distributed run leaves no process-group thread behind, so the interpreter's shutdown cannot race a
gloo worker (that race aborted finished runs: "terminate called without an active exception", SIGABRT)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.helpers import ROOT, base_args, env_for, free_port, make_task_dir, run_finetune

WORKER = Path(__file__).with_name("clean_exit_worker.py")
LEAK_WARNING = "process-group threads still running"
linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
# MP 2 with DeepSpeed's plain path; DP 2 with ZeRO 2 and bf16, whose optimizer hooks every gradient accumulator
RUNS = pytest.mark.parametrize("mp_size,zero_stage,precision", [(2, 0, "fp32"), (1, 2, "bf16")],
                               ids=["mp2-zero0-fp32", "dp2-zero2-bf16"])


@linux_only
@RUNS
def test_teardown_joins_every_process_group_thread(mp_size, zero_stage, precision):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(mp_size), str(zero_stage), precision]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decoder = json.JSONDecoder()
    results = [decoder.raw_decode(part)[0] for part in proc.stdout.split("RESULTS ")[1:]]
    assert len(results) == 2, proc.stdout[-2000:]
    for r in results:
        # DeepSpeed imports torch.distributed.nn while building the engine; had it been imported after the world
        # group existed, its default arguments would hold that group (and its threads) until the interpreter ends.
        assert r["broadcast_default_group"] == "None"
        assert not r["threads"], r["threads"]


@linux_only
@RUNS
def test_finetune_releases_every_process_group(tmp_path, mp_size, zero_stage, precision):
    """finetune_cpm2.py end to end (train with checkpoints, then test): teardown finds no group thread left, so
    it does not warn, and the run exits 0."""
    data, vocab = make_task_dir(tmp_path / "task", train=32, dev=8, test=8)
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
    args = ["--do-train", "--do-valid", "--do-eval", "--random-init", "--batch-size", "4", "--train-iters", "4",
            "--eval-interval", "2", "--save-interval", "2", "--model-parallel-size", str(mp_size),
            "--deepspeed-config", str(ds_config), *(["--bf16"] if precision == "bf16" else [])]
    proc = run_finetune(base_args(data, vocab, tmp_path / "run", *args), nproc=2)
    out = proc.stdout + proc.stderr
    assert LEAK_WARNING not in out, out[-3000:]
