"""Subprocess worker for test_grad_clip.py: three fp32 ZeRO-0 training steps of a tiny model through
training.engine.build_engine, with our clipping (fused into AdamW, or the foreach fallback) or DeepSpeed's own.

Prints ``RESULTS {json}`` with, per run: losses, the clipping object installed, the first step's gradient norm as
ours computes it and as ``torch.nn.utils.get_total_norm`` does, and the final parameters' checksum vector.
"""
from __future__ import annotations

import json
import sys

import torch

from training.setup import init_distributed, teardown


def run(mode: str, max_norm: float) -> dict:
    import training.engine as engine_module
    import training.grad_clip as grad_clip
    from model import EncDecConfig, EncDecModel
    from training.engine import OptimSettings, build_ds_config, build_engine
    from training.objectives import lm_loss, model_inputs

    engine_module._FUSED_CLIPPING = mode != "deepspeed"
    if mode == "foreach":
        grad_clip._supports_grad_scale = lambda optimizer: False
    cfg = EncDecConfig(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                       vocab_size=120, dropout_rate=0.0)
    torch.manual_seed(0)
    model = EncDecModel(cfg)
    settings = OptimSettings(lr=1e-2, weight_decay=0.01, clip_grad=max_norm, micro_batch_size=4, grad_acc_steps=1,
                             dp_size=1, fp16=False, bf16=False, warmup_steps=0, decay_steps=100,
                             decay_style="constant")
    engine, _, _ = build_engine(model, settings, build_ds_config(None, settings), prompt_only=False)
    gen = torch.Generator().manual_seed(1)
    ids = lambda *shape: torch.randint(2, cfg.vocab_size, shape, generator=gen)  # noqa: E731
    batch = {"enc_input_ids": ids(4, 12), "enc_attention_mask": torch.ones(4, 12, dtype=torch.long),
             "dec_input_ids": ids(4, 6), "cross_attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": ids(4, 6), "loss_mask": torch.ones(4, 6)}
    clipper = engine.clip_fp32_gradients
    losses, norms = [], None
    for step in range(3):
        out = engine(**model_inputs(batch))
        loss = lm_loss(out["lm_logits"], batch["labels"], batch["loss_mask"])
        engine.backward(loss)
        if step == 0:
            params = [p for p in model.parameters() if p.grad is not None]
            ours = grad_clip.global_grad_norm(params).item()
            reference = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
            norms = (ours, reference)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "clipper": type(clipper).__name__, "norms": norms,
            "grad_scale_after_step": getattr(engine.optimizer, "grad_scale", None) is not None,
            "params": [float(p.double().sum()) for p in model.parameters()],
            "params_abs": [float(p.double().abs().sum()) for p in model.parameters()]}


if __name__ == "__main__":
    init_distributed(1)
    mode, max_norm = sys.argv[1], float(sys.argv[2])
    print("RESULTS " + json.dumps(run(mode, max_norm)), flush=True)
    teardown()  # joins the process groups' threads: the interpreter then exits cleanly (test_clean_exit.py)
