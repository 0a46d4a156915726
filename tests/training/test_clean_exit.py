"""A finished distributed run leaves no process-group thread behind, so the interpreter's shutdown cannot race a
gloo worker (that race aborted finished runs: "terminate called without an active exception", SIGABRT)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.helpers import ROOT, env_for, free_port

WORKER = Path(__file__).with_name("clean_exit_worker.py")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
def test_teardown_joins_every_process_group_thread():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split("RESULTS ", 1)[1]) for line in proc.stdout.splitlines() if "RESULTS " in line]
    assert len(results) == 2, proc.stdout[-2000:]
    for r in results:
        # DeepSpeed imports torch.distributed.nn while building the engine; had it been imported after the world
        # group existed, its default arguments would hold that group (and its threads) until the interpreter ends.
        assert r["broadcast_default_group"] == "None"
        assert not [name for name in r["threads"] if "gloo" in name], r["threads"]
