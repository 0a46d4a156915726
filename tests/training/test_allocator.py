"""training/allocator.py: the glibc malloc tunables and the re-exec that applies them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import allocator

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from training.allocator import reexec_with_tuned_malloc
reexec_with_tuned_malloc(force=True)
print(json.dumps({{"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "unbuffered": "-u" in sys.orig_argv}}))
"""


def test_merge_adds_ours_and_keeps_the_users_values():
    assert allocator.merged_tunables(None) == ":".join(f"{k}={v}" for k, v in allocator.TUNABLES.items())
    merged = allocator.merged_tunables("glibc.malloc.trim_threshold=5:glibc.malloc.hugetlb=1")
    items = dict(item.split("=") for item in merged.split(":"))
    assert items["glibc.malloc.trim_threshold"] == "5"  # the user's value wins
    assert items["glibc.malloc.hugetlb"] == "1"
    assert items["glibc.malloc.mmap_max"] == "0"
    assert allocator.is_tuned({"GLIBC_TUNABLES": merged})
    assert not allocator.is_tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not allocator.is_tuned({})


def _run_probe(env_extra: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT_VAR, allocator._REEXEC_MARK)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-u", "-c", PROBE.format(root=str(ROOT)), *args], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_reexec_sets_the_tunables_and_keeps_argv_and_interpreter_flags():
    seen = _run_probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "--a", "b c")
    assert allocator.is_tuned({"GLIBC_TUNABLES": seen["tunables"]})
    assert "glibc.malloc.hugetlb=1" in seen["tunables"]
    assert seen["argv"] == ["--a", "b c"]
    assert seen["unbuffered"]  # -u survived the re-exec


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_opt_out_leaves_the_environment_alone():
    seen = _run_probe({allocator.OPT_OUT_VAR: "0"})
    assert seen["tunables"] is None


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_the_entry_point_runs_tuned_on_cpu(monkeypatch):
    """finetune_cpm2.py re-executes itself before parsing: --help output comes from the tuned process."""
    if allocator.has_nvidia_gpu():
        pytest.skip("GPU host: the entry point deliberately keeps glibc's defaults there")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator._REEXEC_MARK)}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import runpy, sys, os; sys.argv = [{script!r}, '--help'];"
            "print('TUNABLES=' + str(os.environ.get('GLIBC_TUNABLES')), flush=True);"
            "runpy.run_path({script!r}, run_name='__main__')")
    # runpy with run_name='__main__' executes the module's start-up code as a script run would; the re-exec then
    # starts `python -c ...` again with the tunables set, which prints them before --help exits.
    out = subprocess.run([sys.executable, "-c", code.format(script=str(ROOT / "finetune_cpm2.py"))], env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TUNABLES=")]
    assert out.returncode == 0, out.stderr[-2000:]
    assert lines[0] == "TUNABLES=None" and allocator.is_tuned({"GLIBC_TUNABLES": lines[-1][len("TUNABLES="):]})
    assert "--task" in out.stdout or "usage" in out.stdout.lower()
