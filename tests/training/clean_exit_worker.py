"""Subprocess worker for test_clean_exit.py: one rank of a gloo world builds a DeepSpeed engine over a tiny model
(``MP_SIZE ZERO_STAGE fp32|bf16``), trains two steps, tears down, and prints ``RESULTS {json}`` with the gloo
threads still alive and the default group bound into torch.distributed.nn.functional."""
from __future__ import annotations

import json
import os
import sys

import torch

import training.setup as _setup
from training.setup import init_distributed


def train_two_steps(mp_size: int, zero_stage: int, precision: str) -> None:
    from model import EncDecConfig, EncDecModel
    from training.engine import OptimSettings, build_ds_config, build_engine
    from training.objectives import lm_loss, model_inputs

    cfg = EncDecConfig(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=1, num_decoder_layers=1,
                       vocab_size=120, dropout_rate=0.0)
    torch.manual_seed(0)
    model = EncDecModel(cfg)
    if precision == "bf16":
        model.bfloat16()
    settings = OptimSettings(lr=1e-2, weight_decay=0.0, clip_grad=1.0, micro_batch_size=2, grad_acc_steps=1,
                             dp_size=int(os.environ["WORLD_SIZE"]) // mp_size, fp16=False, bf16=precision == "bf16",
                             warmup_steps=0, decay_steps=10, decay_style="constant")
    ds_config = build_ds_config(None, settings)
    ds_config["zero_optimization"] = {"stage": zero_stage}
    engine, _, _ = build_engine(model, settings, ds_config, prompt_only=False)
    ids = torch.randint(2, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"enc_input_ids": ids, "enc_attention_mask": torch.ones_like(ids), "dec_input_ids": ids[:, :4],
             "cross_attention_mask": torch.ones_like(ids), "labels": ids[:, 1:5], "loss_mask": torch.ones(2, 4)}
    for _ in range(2):
        out = engine(**model_inputs(batch))
        engine.backward(lm_loss(out["lm_logits"], batch["labels"], batch["loss_mask"]))
        engine.step()
    engine.destroy()  # as finetune_cpm2.run does after training: removes the optimizer's C++ gradient hooks


if __name__ == "__main__":
    mp_size, zero_stage, precision = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    init_distributed(mp_size)
    train_two_steps(mp_size, zero_stage, precision)
    import torch.distributed.nn.functional as dist_nn

    bound_default = dist_nn.broadcast.__defaults__[-1]
    _setup.teardown()
    # one write per line: two ranks share the launcher's stdout
    sys.stdout.write("RESULTS " + json.dumps({"threads": _setup.process_group_threads(),
                                              "broadcast_default_group": repr(bound_default)}) + "\n")
    sys.stdout.flush()
