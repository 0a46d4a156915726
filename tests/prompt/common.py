"""Fixtures for the prompt-tuning tests: a tiny LCQMC set whose vocab has the prompt separator, a tiny base
checkpoint in the released layout, prompt configs, and readers for saved prompts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.training.helpers import ROOT, TINY_CONFIG

PROMPT_LEN = 10


def _import_production_training() -> None:
    """pytest puts tests/ on sys.path (for tests/conftest.py), and the regular package tests/training then shadows
    the production namespace package `training/` (it has no __init__.py) on a bare `import training`. Import the
    production one first, with tests/ out of the way; the namespace package keeps its path afterwards."""
    mod = sys.modules.get("training")
    if mod is not None and getattr(mod, "__file__", None) is None:
        return  # already the namespace package
    for name in [n for n in sys.modules if n == "training" or n.startswith("training.")]:
        del sys.modules[name]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "tests"]
    try:
        import training  # noqa: F401
        import training.prompt_tuning  # noqa: F401
    finally:
        sys.path[:] = saved


_import_production_training()


def make_prompt_task(root: Path, *, train: int = 64, dev: int = 16, test: int = 16) -> tuple[Path, Path]:
    """(data dir, vocab dir): tools/make_demo_data's LCQMC set, with `；` added to the vocab corpus, because the
    LCQMC prompt layout inserts it before an empty middle gap (ratio_list [r, 0, ...] and the scripts' 5_5_0)."""
    from tools.make_demo_data import write_dataset

    data = root / "data"
    write_dataset(str(data), train=train, dev=dev, test=test, seed=0)
    with open(data / "corpus.txt", "a", encoding="utf-8") as f:
        f.write("；\n")
    vocab = root / "vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_vocab.py"), "--corpus", str(data / "corpus.txt"),
                    "--out", str(vocab / "vocab.txt")], check=True, capture_output=True)
    return data, vocab


def tiny_model(vocab: Path, *, seed: int = 0, prompt_config: dict | None = None, config_path: Path = TINY_CONFIG):
    from model import EncDecConfig, EncDecModel
    from tokenization_enc_dec import load_tokenizer

    config = EncDecConfig.from_json_file(str(config_path))
    config.vocab_size = load_tokenizer(str(vocab)).vocab_size
    torch.manual_seed(seed)
    return EncDecModel(config, prompt_config=prompt_config)


def make_base_checkpoint(vocab: Path, out: Path, *, seed: int = 0, iteration: int = 1000) -> Path:
    """A randomly initialised tiny model saved like a released checkpoint (tracker + <iter>/mp_rank_00...)."""
    from model.checkpoint import save_model_checkpoint, write_tracker

    save_model_checkpoint(tiny_model(vocab, seed=seed), out, iteration, mp_rank=0, mp_size=1)
    write_tracker(out, iteration)
    return out


def prompt_config(**overrides) -> dict:
    """The shipped lcqmc_5_5_0 config with PROMPT_LEN positions; keys overridden (enc keys via enc={...})."""
    enc = {"prompt_len": PROMPT_LEN, "init_tokens": "", "default_init_token": "<mask>", "ratio_list": [0.5, 0.5, 0.0]}
    enc.update(overrides.pop("enc", {}))
    cfg = {"init_scratch": True, "fix_model": True, "init_from_vocab": False, "enc": enc,
           "dec": {"prompt_len": 0, "init_tokens": "", "default_init_token": "<mask>"}}
    cfg.update(overrides)
    return cfg


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def saved_prompt(path: Path) -> torch.Tensor:
    from training.prompt_tuning import load_prompt_tensor

    return load_prompt_tensor(str(path)).float()


def metrics(save: Path, split: str) -> dict:
    return json.loads((save / split / "metrics.json").read_text())


def same_metrics(a: dict, b: dict) -> bool:
    """Equal metrics from two processes: every key exactly, except the mean loss within 1e-6 (relative). The
    oneDNN GEMM may sum in another order in a fresh process (memory alignment), moving the loss in its last bits;
    predictions, and so every task metric, must not move at all."""
    if a.keys() != b.keys():
        return False
    return all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) if k == "loss" else a[k] == b[k] for k in a)


def predictions(save: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in open(save / split / "predictions.jsonl", encoding="utf-8")]
