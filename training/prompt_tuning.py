"""Prompt tuning on the model side: initialise the soft prompt, choose what trains, load a prompt checkpoint.

The original initialised the prompt before loading the checkpoint, i.e. 100 copies of a *random* `<mask>`
embedding (original-toolkit.md §6). Here the default ("tokens") copies the rows of the **loaded** embeddings;
the original's behaviour is available only under the explicit key `init_before_load: true`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import mpu
from model.checkpoint import find_shards, iteration_dir, read_model_states, read_tracker

logger = logging.getLogger("cpm2")

PROMPT_KEY = "encoder.prompt_embeds.weight"


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
    value = load_prompt_tensor(path)
    prompt = model.encoder.prompt_embeds.weight
    if tuple(value.shape) != tuple(prompt.shape):
        raise ValueError(f"{path}: {PROMPT_KEY} has shape {tuple(value.shape)}, the model's prompt is "
                         f"{tuple(prompt.shape)}: check prompt_len in --prompt-config")
    with torch.no_grad():
        prompt.copy_(value.to(prompt.dtype))
    logger.info("loaded the soft prompt from %s", path)
