"""Evaluation and inference: one scorer per task kind, records gathered over data-parallel ranks, then the
task's metric. Every run writes SAVE/<split>/predictions.jsonl and SAVE/<split>/metrics.json atomically.

Scorers (looked up by `Task.kind`):
- classify: teacher-forced forward with decoder input [<s>, <s_0>]; the prediction is the argmax over *this
  example's* candidate words at the label position (the original took the argmax over the whole vocab);
- generate: batched generation (greedy / sampling / beam) with the KV and cross-attention caches;
- rank: the logit of the task's score token at the last decoder position for every document of a query.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm import tqdm

import mpu
from mpu import fast_linear
from training import faults
from training.objectives import lm_loss, model_inputs, token_logit

logger = logging.getLogger("cpm2")


@dataclass
class EvalContext:
    model: torch.nn.Module          # the bare EncDecModel (not the engine): no optimizer work in eval
    task: object
    tokenizer: object
    device: torch.device
    gen_config: object | None       # model.generation.GenerationConfig for generate tasks
    score_token_id: int | None      # rank tasks
    show_progress: bool
    seed: int = 1234                # sampling: every evaluation draws from a generator seeded with it, so runs
                                    # are reproducible and all model-parallel ranks draw the same tokens


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _decode_answer(tokenizer, ids: list[int], eos_id: int, pad_id: int) -> str:
    out = []
    for i in ids:
        if i == eos_id or i == pad_id:
            break
        out.append(i)
    return tokenizer.decode(out)


def _classify(ctx: EvalContext, batch: dict, examples: list[dict]) -> tuple[list[dict], torch.Tensor]:
    out = ctx.model(**model_inputs(batch))
    logits = out["lm_logits"]  # [B, Ld, V/mp]
    loss = lm_loss(logits, batch["labels"], batch["loss_mask"])
    full = mpu.gather_from_model_parallel_region(logits[:, 1, :].float())  # [B, V]: label position after <s_0>
    cands = batch["candidate_ids"]  # [B, C], -1 = padding
    scores = full.gather(1, cands.clamp(min=0)).masked_fill(cands < 0, float("-inf"))  # [B, C]
    pred = scores.argmax(-1).tolist()
    records = []
    for row, ex in enumerate(examples):
        cand_ids = [c for c in ex["candidate_ids"]]
        records.append({
            "id": ex["id"], "input": ex.get("input_text"),
            "prediction": ctx.tokenizer.decode([cand_ids[pred[row]]]),
            "reference": ex.get("reference"),
            "pred_index": pred[row], "label_index": ex.get("label_index", -1),
        })
    return records, loss


def _generate(ctx: EvalContext, batch: dict, examples: list[dict]) -> tuple[list[dict], torch.Tensor]:
    from model.generation import generate

    loss = lm_loss(ctx.model(**model_inputs(batch))["lm_logits"], batch["labels"], batch["loss_mask"])
    enc_mask = batch["enc_attention_mask"]
    if enc_mask.dim() != 2:  # prompt mask ablations: generation takes the key-padding mask
        enc_mask = batch["cross_attention_mask"]
    tokens = generate(ctx.model, batch["enc_input_ids"], enc_mask, ctx.gen_config, generator=ctx.generator)
    cfg = ctx.gen_config
    records = []
    for row, ex in enumerate(examples):
        records.append({
            "id": ex["id"], "input": ex.get("input_text"),
            "prediction": _decode_answer(ctx.tokenizer, tokens[row].tolist(), cfg.eos_id, cfg.pad_id),
            "reference": ex.get("reference"),
        })
    return records, loss


def _rank(ctx: EvalContext, batch: dict, examples: list[dict]) -> tuple[list[dict], torch.Tensor]:
    logits = ctx.model(**model_inputs(batch))["lm_logits"]
    group = int(batch["group_size"])
    scores = token_logit(logits, logits.shape[1] - 1, ctx.score_token_id).view(-1, group)  # [B, G]
    sizes = batch["group_mask"].sum(-1).tolist()  # documents per query; the rest of each row is padding
    records = []
    for row, (ex, n) in enumerate(zip(examples, sizes)):
        doc_scores = scores[row, :int(n)].tolist()
        records.append({
            "id": ex["id"], "input": ex.get("input_text"), "prediction": doc_scores,
            "reference": ex.get("reference"), "label_index": ex.get("label_index", -1),
        })
    return records, scores.new_zeros(())


SCORERS: dict[str, Callable[[EvalContext, dict, list[dict]], tuple[list[dict], torch.Tensor]]] = {
    "classify": _classify, "generate": _generate, "rank": _rank,
}


def _gather_records(records: list[dict]) -> list[dict]:
    """All data-parallel ranks' records on every rank (each MP group holds identical copies)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or mpu.get_data_parallel_world_size() == 1:
        return records
    parts: list = [None] * mpu.get_data_parallel_world_size()
    dist.all_gather_object(parts, records, group=mpu.get_data_parallel_group())
    return [r for part in parts for r in part]


@torch.inference_mode()
def run_evaluation(ctx: EvalContext, dataset, batches: Iterable[tuple[dict, list[int]]], *, desc: str) -> tuple[dict, list[dict]]:
    """Score every example of this rank's shard; returns (metrics, records sorted by dataset index)."""
    scorer = SCORERS[ctx.task.kind]
    ctx.generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    was_training = ctx.model.training
    ctx.model.eval()
    records: list[dict] = []
    loss_sum, n_batches = None, 0
    # No weight changes during an evaluation: oneDNN may pack them once for all its batches (mpu.fast_linear).
    try:
        with fast_linear.packed_weights():
            for batch, indices in tqdm(batches, desc=desc, disable=not ctx.show_progress, leave=False):
                batch = _to_device(batch, ctx.device)
                examples = [dataset[i] for i in indices]
                recs, loss = scorer(ctx, batch, examples)
                for rec, idx in zip(recs, indices):
                    rec["index"] = idx
                records.extend(recs)
                faults.maybe_kill("eval")
                loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
                n_batches += 1
    finally:
        ctx.model.train(was_training)
    local_loss = (loss_sum.item() / n_batches) if n_batches else float("nan")
    records = sorted(_gather_records(records), key=lambda r: r["index"])
    metrics = ctx.task.compute_metrics(records) if _has_references(records) else {}
    metrics = {k: float(v) for k, v in metrics.items()}
    if ctx.task.kind != "rank":
        metrics["loss"] = _mean_over_dp(local_loss, n_batches)
    metrics["num_examples"] = len(records)
    return metrics, records


def _has_references(records: list[dict]) -> bool:
    return bool(records) and all(r.get("reference") is not None for r in records)


def _mean_over_dp(local_mean: float, n: int) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or mpu.get_data_parallel_world_size() == 1:
        return local_mean
    t = torch.tensor([local_mean * n if n else 0.0, float(n)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=mpu.get_data_parallel_group())
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def write_results(save_dir: str, split: str, metrics: dict, records: list[dict]) -> None:
    """SAVE/<split>/predictions.jsonl and metrics.json, replaced as a pair.

    Both files are first written in full to temp files beside them (the step that can fail on a full disk);
    only then are both renamed into place. A failed write leaves the previous pair untouched, never new
    predictions beside old metrics.
    """
    import tempfile

    out_dir = os.path.join(save_dir, split)
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for r in records:
        rec = {k: v for k, v in r.items() if k != "index"}
        lines.append(json.dumps(rec, ensure_ascii=False))
    contents = {"predictions.jsonl": "\n".join(lines) + ("\n" if lines else ""),
                "metrics.json": json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"}
    staged: dict[str, str] = {}  # final name -> temp path
    try:
        for name, text in contents.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            staged[name] = tmp
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, os.path.join(out_dir, name))
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
