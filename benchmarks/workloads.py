"""The timed work of the benchmarks, for ours and the HF peer: one training step, one `generate` call.

Ours trains through the code path of `finetune_cpm2.py`: `training.engine.build_ds_config` / `build_engine`
(DeepSpeed, client AdamW, ZeRO 0, clipping 1.0) and `training.loop.Trainer.train_step` with the task loss
`training.objectives.loss_for_kind("generate")` (= `lm_loss`). The peer is the plain PyTorch loop anybody writes
around `T5ForConditionalGeneration`: forward, the same per-example-mean CE, backward, clip to 1.0, AdamW step.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from benchmarks.hf_peer import HF_EOS_ID, HF_PAD_ID, HF_START_ID
from model import EncDecConfig

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


def make_batch(cfg: EncDecConfig, batch: int, enc_len: int, dec_len: int, *, device="cpu", seed: int = 0,
               prompt_len: int = 0) -> Dict[str, torch.Tensor]:
    """A collated training batch (docs/design.md layout): no padding (masks all ones), random ids >= 2.

    With `prompt_len` P the first P encoder positions are the soft-prompt ids -1..-P (prompt tuning).
    """
    gen = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, cfg.vocab_size, (batch, enc_len), generator=gen)
    if prompt_len:
        enc[:, :prompt_len] = -torch.arange(1, prompt_len + 1)
    dec = torch.randint(2, cfg.vocab_size, (batch, dec_len), generator=gen)
    labels = torch.randint(2, cfg.vocab_size, (batch, dec_len), generator=gen)
    ones_enc = torch.ones(batch, enc_len, dtype=torch.long)
    out = {"enc_input_ids": enc, "enc_attention_mask": ones_enc, "dec_input_ids": dec,
           "cross_attention_mask": ones_enc.clone(), "labels": labels,
           "loss_mask": torch.ones(batch, dec_len, dtype=torch.float32)}
    return {k: v.to(device) for k, v in out.items()}


def tokens_in(batch: Dict[str, torch.Tensor]) -> int:
    """Encoder + decoder tokens of a batch (the throughput unit of `train`, as training.reporting counts them)."""
    return int(batch["enc_input_ids"].numel() + batch["dec_input_ids"].numel())


# -- training ------------------------------------------------------------------------------------------------------

class OursTrainStep:
    """Our step: DeepSpeed engine from training.engine, `Trainer.train_step` from training.loop."""

    def __init__(self, model: torch.nn.Module, *, micro_batch_size: int, bf16: bool = False,
                 prompt_only: bool = False, device: torch.device = torch.device("cpu")) -> None:
        from training.engine import OptimSettings, build_ds_config, build_engine

        settings = OptimSettings(lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP, micro_batch_size=micro_batch_size,
                                 grad_acc_steps=1, dp_size=1, fp16=False, bf16=bf16, warmup_steps=0,
                                 decay_steps=10 ** 6, decay_style="linear")
        self.engine, _, _ = build_engine(model, settings, build_ds_config(None, settings), prompt_only=prompt_only)
        self.code_path = "training.loop.Trainer.train_step"
        try:
            self.trainer = _make_trainer(self.engine, model, device, prompt_only)
        except TypeError as err:  # the Trainer's constructor changed: keep timing the same three engine calls
            self.trainer, self.code_path = None, f"engine forward/backward/step (Trainer unusable: {err})"

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        self.engine.train()
        if self.trainer is not None:
            return self.trainer.train_step([batch])
        from training.objectives import lm_loss, model_inputs

        out = self.engine(**model_inputs(batch))
        loss = lm_loss(out["lm_logits"], batch["labels"], batch["loss_mask"])
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


def _make_trainer(engine, model, device, prompt_only: bool):
    from training.loop import LoopSettings, Trainer
    from training.objectives import loss_for_kind

    big = 10 ** 9
    settings = LoopSettings(epochs=1, train_iters=big, grad_acc_steps=1, log_interval=big, eval_interval=big,
                            save_interval=big, do_valid=False, save_dir="", seed=0, fp16=False, max_nonfinite_steps=1,
                            prompt_only=prompt_only)
    return Trainer(engine=engine, model=model, loss_fn=loss_for_kind("generate"), make_train_batches=None,
                   micro_batches_per_epoch=0, dev=None, eval_ctx=None, settings=settings, sink=None, best=None,
                   main_metric="", is_main=True, device=device)


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Same maths as training.objectives.lm_loss, in plain torch: logits [B, L, V] -> scalar."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return ((per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()


class HFTrainStep:
    """The peer's step: forward, per-example-mean CE, backward, clip_grad_norm_(1.0), AdamW step, zero_grad."""

    def __init__(self, hf: torch.nn.Module, *, fused: Optional[bool] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        """`autocast_dtype`: run the forward under torch.autocast (HF Trainer's `--bf16`: fp32 weights and
        optimizer, bf16 matmuls); None = plain forward in the weights' dtype."""
        self.hf = hf
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in hf.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY,
                                           fused=fused)

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        self.hf.train()
        device_type = batch["enc_input_ids"].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.hf(input_ids=batch["enc_input_ids"], attention_mask=batch["enc_attention_mask"],
                          decoder_input_ids=batch["dec_input_ids"], use_cache=False)
        loss = per_example_ce(out.logits, batch["labels"], batch["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def timed(step: Callable[[Dict[str, torch.Tensor]], object], batch, sync: Callable[[], None] = lambda: None
          ) -> Callable[[], float]:
    """A runner for `common.alternate`: seconds of one call of `step(batch)`."""
    def run() -> float:
        sync()
        start = time.perf_counter()
        step(batch)
        sync()
        return time.perf_counter() - start
    return run


# -- generation ----------------------------------------------------------------------------------------------------

def ours_generate(model, enc_ids: torch.Tensor, enc_mask: torch.Tensor, *, new_tokens: int, beams: int
                  ) -> torch.Tensor:
    """Exactly `new_tokens` new tokens per input (min_length = max_length: stopping disabled). [B, T]."""
    from model.generation import GenerationConfig, generate

    config = GenerationConfig(max_length=new_tokens, min_length=new_tokens, num_beams=beams, eos_id=HF_EOS_ID,
                              pad_id=HF_PAD_ID, decoder_prefix=[HF_START_ID])
    model.eval()
    return generate(model, enc_ids, enc_mask, config)


def hf_generate(hf, enc_ids: torch.Tensor, enc_mask: torch.Tensor, *, new_tokens: int, beams: int) -> torch.Tensor:
    """HF `generate()` with min_new_tokens = max_new_tokens; returns the new tokens [B, T] (start token dropped)."""
    hf.eval()
    out = hf.generate(input_ids=enc_ids, attention_mask=enc_mask, min_new_tokens=new_tokens,
                      max_new_tokens=new_tokens, num_beams=beams, do_sample=False, use_cache=True)
    return out[:, 1:]
