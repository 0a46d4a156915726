"""Prompt tuning on the model side: initialise the soft prompt, choose what trains, load a prompt checkpoint,
and record what a prompt-only checkpoint needs besides itself (its prompt config and its base checkpoint).

The original initialised the prompt before loading the checkpoint, i.e. 100 copies of a *random* `<mask>`
embedding (original-toolkit.md §6). Here the default ("tokens") copies the rows of the **loaded** embeddings;
the original's behaviour is available only under the explicit key `init_before_load: true`.

A prompt-only checkpoint (`fix_model`) holds the prompt and its optimizer state, not the frozen model. Next to
it (`SAVE/best/`, `SAVE/checkpoints/`) go `prompt_config.json` (the config it was trained with) and
`base_checkpoint.json` (`{"load": BASE or null, "seed": S}`): the frozen weights it goes with. `--resume`
checks the pointer against `--load` (see `check_resume_base`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

import mpu
from model.checkpoint import atomic_write_text, find_shards, iteration_dir, read_model_states, read_tracker

logger = logging.getLogger("cpm2")

PROMPT_KEY = "encoder.prompt_embeds.weight"
PROMPT_CONFIG_FILE = "prompt_config.json"
BASE_POINTER_FILE = "base_checkpoint.json"


def embedding_rows(word_embeds: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Full rows [len(ids), d] of a vocab-parallel embedding, identical on every MP rank."""
    weight = word_embeds.weight  # [V/mp, d] on this rank
    part = weight.shape[0]
    start = mpu.get_model_parallel_rank() * part
    idx = torch.tensor(ids, dtype=torch.long, device=weight.device)
    local = (idx >= start) & (idx < start + part)
    rows = weight.detach()[(idx - start).clamp(0, part - 1)] * local.unsqueeze(-1).to(weight.dtype)
    return mpu.reduce_from_model_parallel_region(rows.float())  # exactly one rank contributes each row


def init_prompt(model: torch.nn.Module, prompt_cfg, tokenizer, *, seed: int) -> str:
    """Set `encoder.prompt_embeds` per the config's init mode; returns a description for the log."""
    mode = prompt_cfg.init_mode
    prompt = model.encoder.prompt_embeds.weight
    if mode == "checkpoint":
        return "kept from the loaded checkpoint (or the default init when it holds no prompt)"
    if mode == "file":
        value = load_prompt_tensor(prompt_cfg.init_file)
        desc = f"from the prompt file {prompt_cfg.init_file}"
    else:
        if mode == "tokens":
            ids = prompt_cfg.init_token_ids(tokenizer)
            desc = f"from {len(set(ids))} distinct rows of the loaded word embeddings"
        elif mode == "random_vocab":
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, tokenizer.vocab_size, (prompt.shape[0],), generator=gen).tolist()
            desc = f"from {prompt.shape[0]} randomly sampled vocab rows (seed {seed})"
        else:
            raise ValueError(f"unknown prompt init mode {mode!r}")
        value = embedding_rows(model.word_embeds, ids)
    if tuple(value.shape) != tuple(prompt.shape):
        raise ValueError(f"prompt init has shape {tuple(value.shape)}, the model's prompt is {tuple(prompt.shape)}")
    with torch.no_grad():
        prompt.copy_(value.to(prompt.dtype))
    return desc


def set_trainable(model: torch.nn.Module, prompt_cfg) -> tuple[int, int]:
    """fix_model: only the prompt trains; fix_prompt: everything but the prompt. Returns (trainable, total)."""
    for name, p in model.named_parameters():
        is_prompt = name == PROMPT_KEY
        if prompt_cfg is not None and prompt_cfg.fix_model:
            p.requires_grad_(is_prompt)
        elif prompt_cfg is not None and prompt_cfg.fix_prompt:
            p.requires_grad_(not is_prompt)
        else:
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_prompt_tensor(path: str) -> torch.Tensor:
    """A prompt from a prompt-only checkpoint dir (tracker + <iter>/mp_rank_00...) or a single .pt file."""
    p = Path(path)
    if p.is_dir():
        shards = find_shards(iteration_dir(p, read_tracker(p)))
        states = read_model_states(shards[0])
    else:
        states = read_model_states(p)
    module = states.get("module", states)
    if PROMPT_KEY not in module:
        raise KeyError(f"{path} holds no {PROMPT_KEY} (keys: {', '.join(list(module)[:5])}...)")
    return module[PROMPT_KEY]


def load_prompt(model: torch.nn.Module, path: str) -> None:
    """Copy the prompt saved in `path` (a prompt-only or full checkpoint dir, or a .pt file) into the model."""
    value = load_prompt_tensor(path)
    prompt = model.encoder.prompt_embeds.weight
    if tuple(value.shape) != tuple(prompt.shape):
        raise ValueError(f"{path}: {PROMPT_KEY} has shape {tuple(value.shape)}, the model's prompt is "
                         f"{tuple(prompt.shape)}: check prompt_len in --prompt-config")
    with torch.no_grad():
        prompt.copy_(value.to(prompt.dtype))
    logger.info("loaded the soft prompt from %s", path)


# ---- what a prompt-only checkpoint points at ------------------------------------------------------------------

def base_pointer(load: str | None, seed: int) -> dict:
    """`{"load": absolute BASE dir or None, "seed": S}`; with no BASE the frozen weights are the seeded random
    init, which the same seed rebuilds exactly."""
    return {"load": os.path.abspath(load) if load else None, "seed": int(seed)}


def write_prompt_metadata(directory: str | os.PathLike, prompt_cfg, *, load: str | None, seed: int) -> None:
    """Write `prompt_config.json` and `base_checkpoint.json` into `directory` (rank 0 only; atomic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / PROMPT_CONFIG_FILE, json.dumps(prompt_cfg.to_dict(), indent=1, ensure_ascii=False))
    atomic_write_text(directory / BASE_POINTER_FILE, json.dumps(base_pointer(load, seed), indent=1))


def read_base_pointer(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / BASE_POINTER_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_resume_base(ckpt_root: str | os.PathLike, *, load: str | None, seed: int) -> None:
    """Before resuming a prompt-only run: the resume checkpoint in `ckpt_root` excludes the frozen weights
    (DeepSpeed `exclude_frozen_parameters`), so they must come from the same base as before. Raises ValueError
    naming the `--load` to pass when `--load` (or, for a random base, `--seed`) differs from the recorded one."""
    ckpt_root = Path(ckpt_root)
    pointer_file = ckpt_root / BASE_POINTER_FILE
    pointer = read_base_pointer(ckpt_root)
    here = base_pointer(load, seed)
    if pointer is None:
        if load is None:
            raise ValueError(f"--resume: the checkpoint in {ckpt_root} holds only the soft prompt (fix_model) and no "
                             f"{BASE_POINTER_FILE} says which base model it goes with: pass --load BASE, the "
                             "checkpoint the run was started from")
        return
    want = pointer.get("load")
    if want is not None and here["load"] is None:
        raise ValueError(f"--resume: the checkpoint in {ckpt_root} holds only the soft prompt (fix_model); the frozen "
                         f"model comes from the base checkpoint: pass --load {want} (not --random-init)")
    if want is None and here["load"] is not None:
        raise ValueError(f"--resume: the prompt in {ckpt_root} was trained on a randomly initialised model "
                         f"(--random-init --seed {pointer.get('seed')}), not on --load {load}; resume with "
                         "--random-init and that seed, or start a new run")
    if want is None and pointer.get("seed") != here["seed"]:
        raise ValueError(f"--resume: the prompt in {ckpt_root} was trained on the random model of --seed "
                         f"{pointer.get('seed')}, this run has --seed {seed}: pass --seed {pointer.get('seed')}")
    if want is not None and os.path.realpath(want) != os.path.realpath(here["load"]):
        raise ValueError(f"--resume: the prompt in {ckpt_root} was trained on --load {want}, this run loads "
                         f"{here['load']}: pass --load {want} (if you moved that checkpoint, edit {pointer_file})")
