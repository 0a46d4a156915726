"""One rank dies (SIGKILL) or hangs: the others end within a bounded time, and the output names the rank.

What happens (CPU, gloo; docs/reliability.md): under `torch.distributed.run` (and `deepspeed`, whose launcher
does the same) the launcher sees the dead child, SIGTERMs the others and prints a report naming the failed rank
and its exit code; the survivors themselves fail at once in their next collective (gloo: "Connection reset by
peer") and say that another process probably died. A hung rank (alive, not answering) is bounded by the
process-group timeout, CPM2_DIST_TIMEOUT_MINUTES.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.training.helpers import ROOT, base_args, env_for, free_port, make_task_dir, run_finetune

from . import project_module

TRAIN = ["--do-train", "--random-init", "--batch-size", "4", "--lr", "3e-3", "--log-interval", "1", "--seed", "7",
         "--train-iters", "6"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"), train=32, dev=4, test=4)


def test_dead_rank_ends_the_run_and_is_named(task, tmp_path):
    data, vocab = task
    started = time.monotonic()
    proc = run_finetune(base_args(data, vocab, tmp_path / "run", *TRAIN), nproc=2, check=False, timeout=120,
                        env=env_for(2, CPM2_FAULT="step:2", CPM2_FAULT_RANK="1"))
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 120, out[-3000:]
    # the launcher's report names the dead rank and how it died
    assert "Root Cause (first observed failure)" in out
    root_cause = out[out.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : -9" in root_cause, root_cause
    # the survivor failed in a collective and says why
    assert "rank 0: a collective operation failed, most likely because another process of this run died" in out


@pytest.mark.slow
def test_hung_rank_is_bounded_by_the_timeout(task, tmp_path):
    """Rank 1 blocks forever inside step 2; rank 0's next collective times out after CPM2_DIST_TIMEOUT_MINUTES
    (here 0.2 min), it exits, and the launcher then stops rank 1."""
    data, vocab = task
    started = time.monotonic()
    proc = run_finetune(base_args(data, vocab, tmp_path / "run", *TRAIN), nproc=2, check=False, timeout=180,
                        env=env_for(2, CPM2_FAULT="step:2", CPM2_FAULT_RANK="1", CPM2_FAULT_ACTION="hang",
                                    CPM2_DIST_TIMEOUT_MINUTES="0.2"))
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 150, out[-3000:]
    assert "rank 0: a collective operation failed" in out and "CPM2_DIST_TIMEOUT_MINUTES" in out, out[-3000:]
    assert "imed out" in out  # gloo: "Timed out waiting ...ms for recv operation to complete"


@pytest.mark.slow
def test_dead_rank_without_a_launcher(task, tmp_path):
    """Two processes started by hand (as a scheduler would, no torch.distributed.run watching them): rank 1 is
    SIGKILLed and rank 0 still exits promptly with the explanation instead of hanging."""
    data, vocab = task
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = env_for(2, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, CPM2_FAULT="step:2", CPM2_FAULT_RANK="1")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "finetune_cpm2.py"),
                                       *base_args(data, vocab, tmp_path / "run", *TRAIN)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out0, _ = procs[0].communicate(timeout=150)
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, out0[-3000:]
    assert "[rank 0] ERROR cpm2: rank 0: a collective operation failed, most likely because another process" in out0


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_bad_dist_timeout_is_refused(monkeypatch, value):
    """CPM2_DIST_TIMEOUT_MINUTES must be a positive number: 0 or garbage would silently mean 'wait for ever' or
    crash inside torch."""
    setup = project_module("training.setup")
    for key, val in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "1", "CPM2_DIST_TIMEOUT_MINUTES": value}.items():
        monkeypatch.setenv(key, val)
    with pytest.raises(ValueError, match=rf"CPM2_DIST_TIMEOUT_MINUTES='{value}' must be a positive number"):
        setup.init_distributed(1)
