"""Disk full (ENOSPC) and unwritable (EACCES) outputs: a clear error at start-up, and a failed checkpoint,
best-checkpoint or predictions write that leaves the previous files and trackers intact.

Tests run as root, where permissions do not block writes, so the faults are injected: `open`, `os.replace`,
`os.fsync`, `tempfile.mkstemp` and `torch.save` are patched to raise. The slow test injects ENOSPC into a real
finetune_cpm2.py run through a `sitecustomize` module and resumes it afterwards.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from model.checkpoint import read_tracker
from tests.training.helpers import (base_args, env_for, make_task_dir, model_weights, run_finetune)

from . import project_module
from .fakes import FakeEngine

state = project_module("training.state")
best_mod = project_module("training.best")
evaluation = project_module("training.evaluation")
finetune = project_module("finetune_cpm2")


def _os_error(code: int, filename=None) -> OSError:
    return OSError(code, os.strerror(code), None if filename is None else str(filename))


def fail_on(monkeypatch, owner, attr: str, *, code: int = errno.ENOSPC, nth: int = 1, when=lambda *a, **k: True):
    """Make `owner.attr` raise OSError(code) on its `nth` call for which `when(*args)` holds."""
    real = getattr(owner, attr)
    seen = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == nth:
                raise _os_error(code, args[-1] if args and isinstance(args[-1], (str, os.PathLike)) else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return seen


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tracked(root: Path) -> dict[str, str]:
    """The files a loader reads: the tracker and the step dir it names (leftover temp dirs aside)."""
    step = str(read_tracker(root))
    return {k: v for k, v in snapshot(root).items() if k.split("/")[0] in (step, "latest_checkpointed_iteration.txt")}


# ---------------------------------------------------------------- start-up: the save dir must be writable

def test_check_save_dir_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match=rf"--save {blocker}/run is not writable \(Not a directory\)"):
        finetune.check_save_dir(str(blocker / "run"))


@pytest.mark.parametrize("code, where", [(errno.EACCES, "open"), (errno.ENOSPC, "write"), (errno.ENOSPC, "fsync")])
def test_check_save_dir_unwritable_or_full(tmp_path, monkeypatch, code, where):
    if where == "open":
        def refuse(*args, **kwargs):
            raise _os_error(code, args[0])

        monkeypatch.setattr(finetune, "open", refuse, raising=False)  # shadows the builtin in that module only
    elif where == "write":
        real_open = open

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, _):
                raise _os_error(code)

        monkeypatch.setattr(finetune, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    else:
        fail_on(monkeypatch, os, "fsync", code=code)
    save = tmp_path / "run"
    with pytest.raises(RuntimeError, match=rf"--save {save} is not writable \({os.strerror(code)}\); choose"):
        finetune.check_save_dir(str(save))
    assert list(save.iterdir()) == []  # the probe file is gone even after a failed write


def test_unwritable_save_dir_fails_before_any_work(tmp_path):
    """finetune_cpm2.py: exit 2 with the message, before data is read or a model built."""
    data, vocab = make_task_dir(tmp_path, train=8, dev=4, test=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_finetune(base_args(data, vocab, blocker / "run", "--do-train", "--random-init", "--train-iters", "1"),
                        check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: --save {blocker}/run is not writable (Not a directory)" in proc.stderr
    assert "tokenised examples" not in proc.stdout and "model:" not in proc.stdout


# ---------------------------------------------------------------- resume checkpoints

def _resume_save(engine, save_dir, step):
    return state.save_resume_checkpoint(engine, str(save_dir), step, {"global_step": step}, frozen_excluded=False)


def _is_step_dir(path) -> bool:
    return Path(path).name.isdigit()


FAULTS = {
    # name: (what to patch, selector) -- each fires during the save of step 4
    "engine torch.save (model states)": (torch, "save", lambda obj, f, *a, **k: "model_states" in str(f)),
    "engine torch.save (optimizer)": (torch, "save", lambda obj, f, *a, **k: "optim_states" in str(f)),
    "rng state write": (tempfile, "mkstemp", lambda *a, **k: "rng_state" in str(k.get("prefix", ""))),
    "trainer_state.json rename": (os, "replace", lambda src, dst: str(dst).endswith("trainer_state.json")),
    "step dir rename": (os, "replace", lambda src, dst: _is_step_dir(dst)),
    "tracker write": (os, "replace", lambda src, dst: str(dst).endswith("latest_checkpointed_iteration.txt")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_resume_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, fault, code):
    engine = FakeEngine(torch.nn.Linear(3, 2))
    _resume_save(engine, tmp_path, 2)
    root = tmp_path / "checkpoints"
    before = tracked(root)
    with torch.no_grad():
        engine.module.weight.add_(1.0)  # step 4's weights differ
    owner, attr, when = FAULTS[fault]
    fail_on(monkeypatch, owner, attr, code=code, when=when)
    with pytest.raises(OSError) as info:
        _resume_save(engine, tmp_path, 4)
    assert info.value.errno == code
    monkeypatch.undo()
    assert read_tracker(root) == 2 and tracked(root) == before  # byte for byte
    assert state.latest_step(str(tmp_path)) == 2
    assert json.loads((root / "2" / "trainer_state.json").read_text()) == {"global_step": 2}
    # the next successful save replaces it and leaves no temp leftovers
    _resume_save(engine, tmp_path, 4)
    assert read_tracker(root) == 4 and sorted(p.name for p in root.iterdir()) == ["4", "latest_checkpointed_iteration.txt"]
    assert torch.equal(model_weights(root)["weight"], engine.module.weight.detach())


# ---------------------------------------------------------------- best-k checkpoints

@pytest.mark.parametrize("fault", ["weights", "tracker", "best.json"])
def test_failed_best_checkpoint_keeps_the_previous_best(tmp_path, monkeypatch, fault):
    model = torch.nn.Linear(3, 2)
    best = best_mod.BestCheckpoints(str(tmp_path), 1, "accuracy")
    assert best.offer(model, 3, 0.5, prompt_only=False)
    before = snapshot(tmp_path / "best")
    with torch.no_grad():
        model.weight.add_(1.0)
    if fault == "weights":
        fail_on(monkeypatch, torch, "save")
    else:
        name = "latest_checkpointed_iteration.txt" if fault == "tracker" else "best.json"
        fail_on(monkeypatch, os, "replace", when=lambda src, dst: str(dst).endswith(name))
    with pytest.raises(OSError):
        best.offer(model, 6, 0.9, prompt_only=False)
    monkeypatch.undo()
    after = snapshot(tmp_path / "best")
    if fault == "best.json":
        # The tracker had already moved on, to step 6's complete weights (written and renamed before it);
        # step 3 is still there, and best.json still lists only step 3.
        assert read_tracker(tmp_path / "best") == 6
        assert torch.equal(model_weights(tmp_path / "best")["weight"], model.weight.detach())
        assert all(after[k] == v for k, v in before.items() if k.startswith("3/"))
    else:
        assert read_tracker(tmp_path / "best") == 3
        assert {k: v for k, v in after.items() if not k.startswith("6/")} == before
    assert json.loads((tmp_path / "best" / "best.json").read_text())["entries"] == [{"step": 3, "value": 0.5}]
    assert not list((tmp_path / "best").rglob("*.tmp"))


# ---------------------------------------------------------------- predictions and metrics

@pytest.mark.parametrize("target, attr, nth", [("mkstemp", "mkstemp", 1), ("mkstemp", "mkstemp", 2),
                                               ("fsync", "fsync", 2), ("replace", "replace", 1)])
def test_failed_results_write_keeps_the_previous_pair(tmp_path, monkeypatch, target, attr, nth):
    old_records = [{"id": 0, "prediction": "相似", "reference": "相似", "index": 0}]
    evaluation.write_results(str(tmp_path), "dev", {"accuracy": 1.0}, old_records)
    before = snapshot(tmp_path / "dev")
    fail_on(monkeypatch, tempfile if attr == "mkstemp" else os, attr, nth=nth)
    with pytest.raises(OSError):
        evaluation.write_results(str(tmp_path), "dev", {"accuracy": 0.0},
                                 [{"id": 0, "prediction": "矛盾", "reference": "相似", "index": 0}])
    monkeypatch.undo()
    assert snapshot(tmp_path / "dev") == before  # both old files, no temp files
    assert json.loads((tmp_path / "dev" / "predictions.jsonl").read_text()) == {"id": 0, "prediction": "相似",
                                                                                 "reference": "相似"}


# ---------------------------------------------------------------- end to end: a full disk during training

SITECUSTOMIZE = textwrap.dedent('''
    """Test-only: make the N-th rename of a checkpoint step dir fail with ENOSPC (a disk that fills up)."""
    import errno, os
    _real, _n = os.replace, {"seen": 0}
    _fail_at = int(os.environ["CPM2_TEST_ENOSPC_AT_SAVE"])

    def _replace(src, dst, *a, **k):
        if os.path.basename(str(dst)).isdigit() and "checkpoints" in str(dst):
            _n["seen"] += 1
            if _n["seen"] == _fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return _real(src, dst, *a, **k)

    os.replace = _replace
''')

TRAIN = ["--do-train", "--random-init", "--batch-size", "8", "--lr", "3e-3", "--log-interval", "1", "--seed", "7",
         "--epochs", "1", "--save-interval", "2"]


@pytest.mark.slow
def test_disk_full_during_training_then_resume(tmp_path):
    """ENOSPC at the 2nd checkpoint (step 4): exit 2 with a message naming the file and the fix; the step-2
    checkpoint is intact; --resume once there is space finishes with the weights of an uninterrupted run."""
    data, vocab = make_task_dir(tmp_path, train=64, dev=8, test=8)
    ref = tmp_path / "ref"
    run_finetune(base_args(data, vocab, ref, *TRAIN))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = env_for(CPM2_TEST_ENOSPC_AT_SAVE="2")
    env["PYTHONPATH"] = f"{inject}{os.pathsep}{env['PYTHONPATH']}"
    save = tmp_path / "run"
    args = base_args(data, vocab, save, *TRAIN, "--resume")
    proc = run_finetune(args, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write {save}/checkpoints/4 (No space left on device)" in proc.stderr
    assert "rerun with --resume" in proc.stderr
    assert read_tracker(save / "checkpoints") == 2
    run_finetune(args)
    want, got = model_weights(ref / "checkpoints"), model_weights(save / "checkpoints")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not [p for p in (save / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
