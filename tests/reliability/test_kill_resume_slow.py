"""20 SIGKILLs at random points of a tiny fine-tuning run, each followed by `--resume`: the finished run's weights,
dev metrics and best-k list equal an uninterrupted run's, and after every kill no checkpoint the loader would
accept is incomplete.

Kill points come from a fixed seed: injected ones (`CPM2_FAULT=step:n|eval:n|save:n`, inside an optimizer step,
an evaluation or a checkpoint write) and kills by the test at a random wall-clock time (Popen + SIGKILL), which
land anywhere, start-up and cache writes included. A run that is not killed (its fault point lies past the end)
finishes its chain, which is then compared with the reference and a fresh chain starts. The default suite has one
kill of each injected kind (tests/training/test_finetune_e2e.py).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_shard, read_model_states, read_tracker
from tests.training.helpers import ROOT, base_args, env_for, make_task_dir, model_weights, run_finetune

SEED = 20_260_917
KILLS = 20
TRAIN = ["--do-train", "--random-init", "--batch-size", "8", "--lr", "3e-3", "--log-interval", "1", "--seed", "7",
         "--do-valid", "--epochs", "2", "--eval-interval", "3", "--save-interval", "2"]  # 16 steps, 6 evals, 8 saves
MAX_COUNT = {"step": 16, "eval": 6, "save": 8}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task_dir(tmp_path_factory.mktemp("lcqmc"))


TRAINING_STARTS = "INFO cpm2: training: "  # logged once the engine is built and the data position restored


def _run(args: list[str], env: dict, log: Path, kill_at: tuple[str, float] | None = None) -> tuple[int, float]:
    """Run finetune_cpm2.py; `kill_at` = ("start" | "training", seconds): SIGKILL that long after the process
    started, or after it logged the start of training. Returns (exit code, seconds from training start to exit
    or kill; 0 if training never started)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "finetune_cpm2.py"), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    started, training_at = time.monotonic(), None
    while proc.poll() is None:
        now = time.monotonic()
        if training_at is None and TRAINING_STARTS in log.read_text(errors="replace"):
            training_at = now
        if kill_at is not None:
            origin = started if kill_at[0] == "start" else training_at
            if origin is not None and now - origin >= kill_at[1]:
                os.kill(proc.pid, signal.SIGKILL)  # a zombie that just exited ignores it: wait() tells which
                break
        if now - started > 600:
            proc.kill()
        time.sleep(0.02)
    rc = proc.wait()
    return rc, (time.monotonic() - training_at) if training_at is not None else 0.0


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    """The uninterrupted run, and how long its training phase (steps, evaluations, saves) took."""
    data, vocab = task
    save = tmp_path_factory.mktemp("uninterrupted")
    rc, training_seconds = _run(base_args(data, vocab, save, *TRAIN), env_for(), save.parent / f"{save.name}.log")
    assert rc == 0 and training_seconds > 0, (save.parent / f"{save.name}.log").read_text()[-3000:]
    return save, training_seconds


def check_no_incomplete_checkpoint(save: Path) -> None:
    """Whatever a tracker names is complete and loads; leftovers (`.tmp-*`, untracked step dirs) are invisible."""
    root = save / "checkpoints"
    if (root / "latest_checkpointed_iteration.txt").exists():
        step = read_tracker(root)
        step_dir = root / str(step)
        assert isinstance(step, int) and step_dir.is_dir(), f"tracker names {step}, missing"
        assert read_model_states(step_dir / "mp_rank_00_model_states.pt")["module"]
        # Optimizer state: in the model-states file under ZeRO stage 0, in *optim_states.pt files under ZeRO.
        # Our own files (DeepSpeed's pickles): read them whole, as --resume will.
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        optim = list(step_dir.glob("*optim_states.pt"))
        assert states.get("optimizer") is not None or optim, f"{step_dir}: no optimizer state"
        for path in optim:
            torch.load(path, map_location="cpu", weights_only=False)
        load_shard(step_dir / "rng_state_rank_00000.pt")
        assert json.loads((step_dir / "trainer_state.json").read_text())["global_step"] == step
    best = save / "best"
    if (best / "latest_checkpointed_iteration.txt").exists():
        assert read_model_states(best / str(read_tracker(best)) / "mp_rank_00_model_states.pt")["module"]
        json.loads((best / "best.json").read_text())


def _metrics(save: Path) -> dict[tuple[str, int], float]:
    """(split, step) -> loss from metrics.jsonl; a step repeated after a resume keeps its last value."""
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["split"], r["step"]): r.get("loss") for r in rows}


def assert_equals_reference(save: Path, ref: Path, history: list) -> None:
    want, got = model_weights(ref / "checkpoints"), model_weights(save / "checkpoints")
    assert want.keys() == got.keys(), history
    differ = [name for name in want if not torch.equal(want[name], got[name])]
    if differ:
        ref_losses, losses = _metrics(ref), _metrics(save)
        first = next((k for k in sorted(ref_losses, key=lambda k: (k[1], k[0])) if losses.get(k) != ref_losses[k]),
                     None)
        worst = max((want[n] - got[n]).abs().max().item() for n in differ)
        pytest.fail(f"{save}: {len(differ)} tensors differ (max |diff| {worst:.3g}); first differing logged loss: "
                    f"{first} {losses.get(first)} vs {ref_losses.get(first)}; history {history}")
    assert json.loads((save / "dev" / "metrics.json").read_text()) == \
        json.loads((ref / "dev" / "metrics.json").read_text()), history
    assert json.loads((save / "best" / "best.json").read_text()) == \
        json.loads((ref / "best" / "best.json").read_text()), history
    leftovers = sorted(p.name for p in (save / "checkpoints").iterdir())
    assert leftovers == ["16", "latest_checkpointed_iteration.txt"], (leftovers, history)


def test_twenty_random_kills_then_resume_equals_uninterrupted(task, reference, tmp_path):
    data, vocab = task
    ref, ref_seconds = reference
    rng = random.Random(SEED)
    kills = {"step": 0, "eval": 0, "save": 0, "clock": 0}
    history: list[tuple] = []  # (chain, how, outcome): printed on failure to replay a case
    chain, save, runs = 0, None, 0
    while sum(kills.values()) < KILLS:
        if save is None:
            chain += 1
            save = tmp_path / f"chain{chain}"
        args = base_args(data, vocab, save, *TRAIN, "--resume")
        kill_at = None
        if rng.random() < 0.55:
            point = rng.choice(sorted(MAX_COUNT))
            how = f"{point}:{rng.randint(1, MAX_COUNT[point])}"
            env = env_for(CPM2_FAULT=how)
        else:  # mostly inside the training phase; sometimes anywhere from process start (start-up, cache)
            kill_at = ("training", rng.uniform(0.0, 1.1) * ref_seconds) if rng.random() < 0.75 else \
                ("start", rng.uniform(0.5, 8.0))
            how, env = f"clock:{kill_at[0]}+{kill_at[1]:.2f}s", env_for()
        runs += 1
        log = tmp_path / f"run{runs}.log"
        rc, _ = _run(args, env, log, kill_at)
        if rc == -9:
            kills[how.split(":")[0]] += 1
            reached = re.findall(r"step (\d+)/16", log.read_text(errors="replace"))
            history.append((chain, how, f"killed after step {reached[-1] if reached else '-'}"))
            check_no_incomplete_checkpoint(save)
            continue
        assert rc == 0, (how, log.read_text()[-3000:], history)
        history.append((chain, how, "finished"))
        assert_equals_reference(save, ref, history)
        save = None
    if save is not None:  # finish the chain of the last kill
        run_finetune(base_args(data, vocab, save, *TRAIN, "--resume"))
        history.append((chain, "-", "finished"))
        assert_equals_reference(save, ref, history)
    assert sum(kills.values()) == KILLS and kills["clock"] > 0 and all(kills[p] > 0 for p in MAX_COUNT), kills
    print(f"{KILLS} kills {kills} over {chain} chains and {runs} runs: {history}")
