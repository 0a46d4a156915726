"""Subprocess worker for test_clean_exit.py: one rank of a gloo world builds a DeepSpeed engine over a tiny model,
trains two steps with a model-parallel all-reduce in each, tears down, and prints ``RESULTS {json}`` with the
threads still alive and the default group bound into torch.distributed.nn.functional."""
from __future__ import annotations

import json
import os
import sys

import torch

from training.setup import init_distributed, teardown


def thread_names() -> list[str]:
    return sorted(open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task"))


def train_two_steps(mp_size: int) -> None:
    from model import EncDecConfig, EncDecModel
    from training.engine import OptimSettings, build_ds_config, build_engine
    from training.objectives import lm_loss, model_inputs

    cfg = EncDecConfig(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=1, num_decoder_layers=1,
                       vocab_size=120, dropout_rate=0.0)
    torch.manual_seed(0)
    model = EncDecModel(cfg)
    settings = OptimSettings(lr=1e-2, weight_decay=0.0, clip_grad=1.0, micro_batch_size=2, grad_acc_steps=1,
                             dp_size=int(os.environ["WORLD_SIZE"]) // mp_size, fp16=False, bf16=False,
                             warmup_steps=0, decay_steps=10, decay_style="constant")
    engine, _, _ = build_engine(model, settings, build_ds_config(None, settings), prompt_only=False)
    ids = torch.randint(2, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"enc_input_ids": ids, "enc_attention_mask": torch.ones_like(ids), "dec_input_ids": ids[:, :4],
             "cross_attention_mask": torch.ones_like(ids), "labels": ids[:, 1:5], "loss_mask": torch.ones(2, 4)}
    for _ in range(2):
        out = engine(**model_inputs(batch))
        engine.backward(lm_loss(out["lm_logits"], batch["labels"], batch["loss_mask"]))
        engine.step()


if __name__ == "__main__":
    mp_size = int(sys.argv[1])
    init_distributed(mp_size)
    train_two_steps(mp_size)
    import torch.distributed.nn.functional as dist_nn

    bound_default = dist_nn.broadcast.__defaults__[-1]
    teardown()
    print("RESULTS " + json.dumps({"threads": thread_names(), "broadcast_default_group": repr(bound_default)}),
          flush=True)
