"""In-process stand-ins for the DeepSpeed engine and the trainer's collaborators, so that checkpoint writing and
the loop's non-finite handling are tested in milliseconds, without a process group or a DeepSpeed build."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from . import project_module

BestCheckpoints = project_module("training.best").BestCheckpoints
_loop = project_module("training.loop")
LoopSettings, Trainer = _loop.LoopSettings, _loop.Trainer


class FakeEngine:
    """What `training.loop` and `training.state` use of a DeepSpeed engine, with DeepSpeed's behaviour:

    * `step()` applies the update on the accumulation boundary only;
    * with `fp16=True`, a non-finite gradient skips the update, counts it in `skipped_steps` and halves the
      loss scale (DeepSpeed's dynamic loss scaler); in fp32 it applies whatever the gradients hold;
    * `save_checkpoint` writes `DIR/<tag>/` with `torch.save` straight to the final names (as DeepSpeed does),
      so a patched `torch.save` / `open` fails it half-way.
    """

    def __init__(self, model: torch.nn.Module, *, fp16: bool = False, grad_acc: int = 1, lr: float = 0.1):
        self.module = model
        self.fp16 = fp16
        self.grad_acc = grad_acc
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.optimizer = SimpleNamespace(cur_scale=2.0 ** 16)
        self.skipped_steps = 0
        self.micro_steps = 0
        self.applied: list[dict[str, torch.Tensor]] = []   # weights after every applied update

    def __call__(self, **inputs):
        return {"lm_logits": self.module(inputs["enc_input_ids"].float())}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def get_lr(self) -> list[float]:
        return [self.opt.param_groups[0]["lr"]]

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_acc:
            return
        finite = all(torch.isfinite(p.grad).all() for p in self.module.parameters() if p.grad is not None)
        if self.fp16 and not finite:
            self.skipped_steps += 1
            self.optimizer.cur_scale /= 2
        else:
            self.opt.step()
            self.applied.append(weights(self.module))
        self.opt.zero_grad(set_to_none=True)

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=False, exclude_frozen_parameters=False):
        step_dir = Path(save_dir) / str(tag)
        step_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **(client_state or {})},
                   step_dir / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": self.opt.state_dict()}, step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return True


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ListSink:
    def __init__(self):
        self.rows: list[tuple[int, str, dict]] = []

    def write(self, step: int, split: str, values: dict) -> None:
        self.rows.append((step, split, dict(values)))

    def close(self) -> None:
        pass


def batches(n: int, *, seed: int = 0) -> list[dict]:
    """`n` tiny regression batches in the collated-batch shape the loop reads (enc/dec ids, masks)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=g)
        out.append({"enc_input_ids": x, "enc_attention_mask": torch.ones(4, 3), "dec_input_ids": torch.ones(4, 2),
                    "cross_attention_mask": torch.ones(4, 3), "target": x.sum(-1, keepdim=True)})
    return out


def mse(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return ((logits - batch["target"]) ** 2).mean()


def make_trainer(save_dir: str | os.PathLike, *, steps: int, fp16: bool = False, max_nonfinite_steps: int = 100,
                 save_interval: int = 1000, log_interval: int = 1, seed: int = 0) -> tuple[Trainer, FakeEngine]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    engine = FakeEngine(model, fp16=fp16)
    data = batches(steps, seed=seed)
    settings = LoopSettings(epochs=1, train_iters=steps, grad_acc_steps=1, log_interval=log_interval, eval_interval=10 ** 9,
                            save_interval=save_interval, do_valid=False, save_dir=str(save_dir), seed=seed, fp16=fp16,
                            max_nonfinite_steps=max_nonfinite_steps, prompt_only=False)
    trainer = Trainer(engine=engine, model=model, loss_fn=mse,
                      make_train_batches=lambda epoch, skip: data[skip:], micro_batches_per_epoch=steps, dev=None,
                      eval_ctx=None, settings=settings, sink=ListSink(), best=BestCheckpoints(str(save_dir), 1, "acc"),
                      main_metric="acc", is_main=True, device=torch.device("cpu"))
    return trainer, engine
