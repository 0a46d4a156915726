"""Teacher-forced scoring: restricted argmax over candidate label tokens (classify) and one token's logit (rank).

At model-parallel size p each rank holds the logits of its contiguous vocab slice [r*V/p, (r+1)*V/p)
(vocab-parallel `lm_head`, SPEC §2). Only the needed columns are exchanged: each rank fills in the candidates it
owns (0 elsewhere) and one all-reduce (sum) over the MP group completes them, so every rank returns the same values.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

import mpu


def _pick_columns(model: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, V or V/mp] at one position, ids [B, C] (>= 0) -> fp32 [B, C] = full-vocab logits[b, ids[b, c]]."""
    world = mpu.get_model_parallel_world_size()
    if world == 1 or not getattr(model, "parallel_output", True):
        return logits.gather(1, ids).float()
    local_vocab = logits.size(-1)
    local_ids = ids - mpu.get_model_parallel_rank() * local_vocab
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    values = logits.gather(1, local_ids.clamp(0, local_vocab - 1)).float()
    values = torch.where(owned, values, torch.zeros_like(values))
    dist.all_reduce(values, group=mpu.get_model_parallel_group())  # exactly one rank owns each id
    return values


@torch.inference_mode()
def score_candidates(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification by restricted argmax at decoder position 1 (the label position after `<s_0>`).

    batch: `enc_input_ids` [B, Le], `enc_attention_mask` ([B, Le] or [B, 1, Le, Le]), `dec_input_ids` [B, >=2]
    starting with [<s>, <s_0>] (only these two are fed), `cross_attention_mask` [B, Le], and `candidate_ids` [B, C]
    (the label tokens of each example, padded with -1).

    Returns (pred_index [B] long: index into candidate_ids, scores [B, C] fp32: the candidates' logits, -inf at
    padding). Unlike the original (argmax over the whole vocabulary, reference §5.3), only the candidates compete.
    """
    candidates = batch["candidate_ids"]
    if candidates.dim() != 2 or batch["dec_input_ids"].size(1) < 2:
        raise ValueError(
            f"score_candidates: need candidate_ids [B, C] and dec_input_ids [B, >=2] ([<s>, <s_0>]), got shapes "
            f"{tuple(candidates.shape)} and {tuple(batch['dec_input_ids'].shape)}"
        )
    out = model(
        enc_input_ids=batch["enc_input_ids"],
        enc_attention_mask=batch.get("enc_attention_mask"),
        dec_input_ids=batch["dec_input_ids"][:, :2],
        cross_attention_mask=batch.get("cross_attention_mask"),
    )
    valid = candidates >= 0
    scores = _pick_columns(model, out["lm_logits"][:, 1, :], candidates.clamp(min=0))
    scores = scores.masked_fill(~valid, float("-inf"))
    return scores.argmax(dim=-1), scores


@torch.inference_mode()
def score_token_logit(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], token_id: int) -> torch.Tensor:
    """The logit [B] fp32 of `token_id` at the last decoder position (rank tasks: the logit of 相关).

    batch: `enc_input_ids`, `enc_attention_mask`, `dec_input_ids` [B, Ld], `cross_attention_mask`, and optionally a
    2-D `dec_attention_mask` [B, Ld] (1 = real): then the last real position of each row is used, else position Ld-1.
    """
    dec_input_ids = batch["dec_input_ids"]
    dec_mask = batch.get("dec_attention_mask")
    out = model(
        enc_input_ids=batch["enc_input_ids"],
        enc_attention_mask=batch.get("enc_attention_mask"),
        dec_input_ids=dec_input_ids,
        dec_attention_mask=dec_mask,
        cross_attention_mask=batch.get("cross_attention_mask"),
    )
    logits = out["lm_logits"]  # [B, Ld, V or V/mp]
    if dec_mask is not None and dec_mask.dim() == 2:
        last = (dec_mask != 0).long().sum(dim=1).clamp(min=1) - 1  # [B]
        logits = logits[torch.arange(logits.size(0), device=logits.device), last]  # [B, V or V/mp]
    else:
        logits = logits[:, -1, :]
    ids = torch.full((logits.size(0), 1), int(token_id), dtype=torch.long, device=logits.device)
    return _pick_columns(model, logits, ids).squeeze(1)
