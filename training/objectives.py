"""Training losses, one per task kind, looked up by `Task.kind` (no branching on task names).

LM loss, as the original computed it (original-toolkit.md §5.1): per-token vocab-parallel cross-entropy, a
masked mean over each example's label tokens, then the mean over the batch. Every example weighs the same
whatever its length. With data parallelism DeepSpeed averages gradients over ranks, which equals the mean over
the global batch because every rank's micro-batch has the same size (training uses drop_last).
"""
from __future__ import annotations

from typing import Callable

import torch

import mpu

TOKEN_SCORED_KINDS = ("classify", "generate")


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments out of a collated batch."""
    return {
        "enc_input_ids": batch["enc_input_ids"],
        "enc_attention_mask": batch["enc_attention_mask"],
        "dec_input_ids": batch["dec_input_ids"],
        "cross_attention_mask": batch["cross_attention_mask"],
    }


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """logits [B, Ld, V/mp], labels [B, Ld], loss_mask [B, Ld] (1 = counted) -> scalar fp32 loss."""
    per_token = mpu.vocab_parallel_cross_entropy(logits.contiguous().float(), labels)  # [B, Ld]
    mask = loss_mask.to(per_token.dtype)
    per_example = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_example.mean()


def token_logit(logits: torch.Tensor, position: int, token_id: int) -> torch.Tensor:
    """Logit of one vocab id at one decoder position from vocab-parallel logits [B, Ld, V/mp] -> [B] fp32.

    The original read it from the local vocab shard (wrong on every rank but one); here the owning rank's value
    is summed over the model-parallel group (zeros elsewhere), with gradient flowing to the owner.
    """
    part = logits.shape[-1]
    rank = mpu.get_model_parallel_rank()
    start = rank * part
    row = logits[:, position, :].float()  # [B, V/mp]
    if start <= token_id < start + part:
        value = row[:, token_id - start]
    else:
        value = row.new_zeros(row.shape[0]) + 0.0 * row.sum(-1)
    return mpu.reduce_from_model_parallel_region(value)


def rank_loss(logits: torch.Tensor, batch: dict, *, score_token_id: int, temperature: float = 1.0) -> torch.Tensor:
    """Pairwise/listwise softmax loss over each query's group (Sogou-Log): the gold document (label_index) should
    score highest. Scores: logit of the score token (相关) at the last decoder position. logits [B*G, Ld, V/mp]."""
    group = int(batch["group_size"])
    scores = token_logit(logits, logits.shape[1] - 1, score_token_id).view(-1, group) / temperature  # [B, G]
    # Queries with fewer documents than G are padded (group_mask 0): those rows never compete.
    scores = scores.masked_fill(batch["group_mask"].to(scores.device) == 0, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, batch["label_index"].to(scores.device))


def loss_for_kind(kind: str, *, score_token_id: int | None = None) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    losses: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
        "classify": lambda logits, b: lm_loss(logits, b["labels"], b["loss_mask"]),
        "generate": lambda logits, b: lm_loss(logits, b["labels"], b["loss_mask"]),
        "rank": lambda logits, b: rank_loss(logits, b, score_token_id=score_token_id),
    }
    if kind not in losses:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(losses)}")
    return losses[kind]
