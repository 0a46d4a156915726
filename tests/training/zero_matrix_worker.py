"""Trains the tiny model a few steps under each DeepSpeed configuration through the code path finetune_cpm2.py
uses (training.engine.build_engine + Trainer.train_step) and prints the losses as JSON. Run as a subprocess."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model import EncDecConfig, EncDecModel  # noqa: E402
from training.engine import OptimSettings, build_ds_config, build_engine  # noqa: E402
from training.objectives import lm_loss, model_inputs  # noqa: E402
from training.setup import init_distributed, set_seed  # noqa: E402


def batch(seed: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(10, vocab, (8, 12), generator=g)
    labels = torch.randint(10, vocab, (8, 4), generator=g)
    dec = torch.cat([torch.ones(8, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return {"enc_input_ids": enc, "enc_attention_mask": torch.ones(8, 12), "dec_input_ids": dec,
            "cross_attention_mask": torch.ones(8, 12), "labels": labels, "loss_mask": torch.ones(8, 4)}


def run(stage: int, precision: str, steps: int = 6) -> list[float]:
    set_seed(1)
    cfg = EncDecConfig.from_json_file(str(ROOT / "configs" / "model" / "tiny_config.json"))
    cfg.vocab_size = 128
    model = EncDecModel(cfg)
    if precision == "bf16":
        model.bfloat16()
    s = OptimSettings(lr=3e-3, weight_decay=0.01, clip_grad=1.0, micro_batch_size=8, grad_acc_steps=2, dp_size=1,
                      fp16=False, bf16=precision == "bf16", warmup_steps=0, decay_steps=steps, decay_style="constant")
    ds = build_ds_config(None, s)
    ds["zero_optimization"] = {"stage": stage}
    engine, _, _ = build_engine(model, s, ds, prompt_only=False)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(2):  # the same two micro-batches every step: the loss must fall
            b = batch(micro, cfg.vocab_size)
            out = engine(**model_inputs(b))
            loss = lm_loss(out["lm_logits"], b["labels"], b["loss_mask"])
            engine.backward(loss)
            engine.step()
            total += loss.item() / 2
        losses.append(total)
    return losses


def main() -> None:
    init_distributed(1)
    results = {f"zero{stage}-{p}": run(stage, p) for stage in (0, 1, 2) for p in ("fp32", "bf16")}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
