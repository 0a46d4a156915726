"""The training loop: `train` -> `train_step` -> `forward_backward`, each short.

Who owns what: DeepSpeed owns gradient accumulation (it steps the optimizer on the boundary micro-step),
clipping, fp16 loss scaling and the LR-scheduler step; this loop owns the data order, logging, evaluation,
best-k and resume checkpoints, and the non-finite-loss guard. Host syncs (`.item()`) happen only on optimizer
step boundaries (one finiteness flag) and on log steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from training import faults
from training.best import BestCheckpoints
from training.evaluation import EvalContext, run_evaluation, write_results
from training.objectives import model_inputs
from training.reporting import MetricsSink, ThroughputMeter
from training.state import save_resume_checkpoint

logger = logging.getLogger("cpm2")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopSettings:
    epochs: int
    train_iters: int              # optimizer steps in total
    grad_acc_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    do_valid: bool
    save_dir: str
    seed: int
    fp16: bool
    max_nonfinite_steps: int
    prompt_only: bool             # fix_model: checkpoints hold the prompt alone


class Trainer:
    def __init__(self, *, engine, model: torch.nn.Module, loss_fn: Callable, make_train_batches: Callable,
                 micro_batches_per_epoch: int, dev: tuple | None, eval_ctx: EvalContext, settings: LoopSettings,
                 sink: MetricsSink, best: BestCheckpoints, main_metric: str, is_main: bool, device: torch.device):
        self.engine = engine
        self.model = model
        self.loss_fn = loss_fn
        self.make_train_batches = make_train_batches  # (epoch, skip_micro_batches) -> iterable of batches
        self.micro_batches_per_epoch = micro_batches_per_epoch
        self.dev = dev                                # (dataset, make_batches) or None
        self.eval_ctx = eval_ctx
        self.s = settings
        self.sink = sink
        self.best = best
        self.main_metric = main_metric
        self.is_main = is_main
        self.device = device
        # resumable counters
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.nonfinite_streak = 0
        self.last_lr = float("nan")

    # -- resumable state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "nonfinite_streak": self.nonfinite_streak, "best": self.best.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.micro_in_epoch = int(state["micro_in_epoch"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.best.load_state_dict(state.get("best", {}))

    # -- the loop --------------------------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor:
        out = self.engine(**model_inputs(batch))
        loss = faults.maybe_poison_loss(self.loss_fn(out["lm_logits"], batch), self.global_step + 1)
        self.engine.backward(loss)
        return loss.detach()

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over `grad_acc_steps` micro-batches; returns the mean loss (a device tensor).

        The finiteness check sits before the boundary `engine.step()`, so that in fp32/bf16 a non-finite loss
        stops the run with the weights of the last good step still in place (and saved).
        """
        losses = []
        for i, batch in enumerate(micro_batches):
            losses.append(self.forward_backward(batch))
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        loss = torch.stack(losses).mean()
        self._check_finite(loss)
        faults.maybe_kill("step")
        self.last_lr = self.engine.get_lr()[0]  # the lr this update uses (the scheduler moves on in step())
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()  # the boundary: DeepSpeed clips, (un)scales and applies the update
        if self.s.fp16 and getattr(self.engine, "skipped_steps", 0) > skipped_before:
            # DeepSpeed skipped the update and lowered the loss scale. Its own message is at INFO, which
            # setup_logging silences, so say it here, after the step, with the new scale (a host-side counter).
            if self.nonfinite_streak:
                logger.warning("step %d: non-finite loss (fp16 overflow), update skipped, loss scale now %s (%d in a "
                               "row of at most %d)", self.global_step + 1, self._loss_scale(), self.nonfinite_streak,
                               self.s.max_nonfinite_steps)
            else:
                logger.warning("step %d: fp16 gradient overflow, update skipped, loss scale now %s",
                               self.global_step + 1, self._loss_scale())
        return loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        # Decide on the data-parallel mean, not this rank's loss: with one rank's loss non-finite, the
        # all-reduced gradients are non-finite on every rank, so every rank must stop (or skip) together; a
        # rank-local decision would leave the others stepping into collectives the stopped rank never joins.
        if bool(torch.isfinite(_mean_over_data_parallel(loss)).item()):
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        step = self.global_step + 1  # 1-based, as in the log lines
        if self.s.fp16 and self.nonfinite_streak < self.s.max_nonfinite_steps:
            # DeepSpeed skips this update and lowers the loss scale (logged after the step); stop only if the
            # scaler never recovers.
            return
        raise NonFiniteLossError(
            f"loss is non-finite at step {step} ({self.nonfinite_streak} step(s) in a row"
            + (f", --max-nonfinite-steps {self.s.max_nonfinite_steps}" if self.s.fp16 else ", fp32/bf16 stop at once")
            + "); lower --lr, check the data, or use --bf16 instead of --fp16. The last good state (step "
            f"{self.global_step}) is saved in {self.s.save_dir}/checkpoints (resume with --resume).")

    def _loss_scale(self):
        opt = getattr(self.engine, "optimizer", None)
        return getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)

    def _log(self, loss_sum: torch.Tensor, n: int, meter: ThroughputMeter) -> None:
        loss = (_mean_over_data_parallel(loss_sum) / max(n, 1)).item()
        lr = self.last_lr
        rate = meter.report(self.global_step)
        scale = self._loss_scale() if self.s.fp16 else None
        logger.info("epoch %d | step %d/%d | lr %.3e | loss %.4f | loss scale %s | %.0f tokens/s | %.1f samples/s | "
                    "elapsed %s | ETA %s", self.epoch + 1, self.global_step, self.s.train_iters, lr, loss,
                    "-" if scale is None else f"{scale:g}", rate["tokens_per_s"], rate["samples_per_s"],
                    rate["elapsed"], rate["eta"])
        values = {"loss": loss, "lr": lr, "tokens_per_s": rate["tokens_per_s"], "samples_per_s": rate["samples_per_s"]}
        if scale is not None:
            values["loss_scale"] = float(scale)
        self.sink.write(self.global_step, "train", values)

    def evaluate_dev(self) -> dict:
        dataset, make_batches = self.dev
        metrics, records = run_evaluation(self.eval_ctx, dataset, make_batches(), desc=f"dev @ step {self.global_step}")
        if self.is_main:
            write_results(self.s.save_dir, "dev", metrics, records)
        self.sink.write(self.global_step, "dev", metrics)
        logger.info("dev @ step %d: %s", self.global_step,
                    " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        value = metrics.get(self.main_metric)
        if value is not None:
            self.best.offer(self.model, self.global_step, value, prompt_only=self.s.prompt_only)
        return metrics

    def save(self) -> None:
        save_resume_checkpoint(self.engine, self.s.save_dir, self.global_step, self.state_dict(),
                               frozen_excluded=self.s.prompt_only)

    def train(self) -> None:
        meter = ThroughputMeter(self.s.train_iters, self.global_step)
        bar = tqdm(total=self.s.train_iters, initial=self.global_step, desc="train", disable=not self.is_main,
                   dynamic_ncols=True)
        loss_sum, n_logged = torch.zeros((), device=self.device), 0
        last_saved = self.global_step
        try:
            while self.global_step < self.s.train_iters and self.epoch < self.s.epochs:
                pending: list[dict] = []
                for batch in self.make_train_batches(self.epoch, self.micro_in_epoch):
                    pending.append(batch)
                    meter.add(int(batch["enc_input_ids"].numel() + batch["dec_input_ids"].numel()),
                              int(batch["enc_input_ids"].shape[0]))
                    if len(pending) < self.s.grad_acc_steps:
                        continue
                    loss = self.train_step(pending)
                    self.micro_in_epoch += len(pending)
                    pending = []
                    self.global_step += 1
                    bar.update(1)
                    if torch.isfinite(loss):
                        loss_sum, n_logged = loss_sum + loss, n_logged + 1
                    if self.global_step % self.s.log_interval == 0:
                        self._log(loss_sum, n_logged, meter)
                        bar.set_postfix(loss=f"{(loss_sum / max(n_logged, 1)).item():.4f}")
                        loss_sum, n_logged = torch.zeros((), device=self.device), 0
                    if self.s.do_valid and self.dev is not None and self.global_step % self.s.eval_interval == 0:
                        self.evaluate_dev()
                    if self.global_step % self.s.save_interval == 0:
                        self.save()
                        last_saved = self.global_step
                    if self.global_step >= self.s.train_iters:
                        break
                if self.global_step >= self.s.train_iters:
                    break
                # Leftover micro-batches that do not fill an accumulation window are dropped, every epoch alike.
                self.epoch += 1
                self.micro_in_epoch = 0
            if self.s.do_valid and self.dev is not None and self.global_step % self.s.eval_interval != 0:
                self.evaluate_dev()
            if self.global_step != last_saved:
                self.save()
        except NonFiniteLossError:
            self.save()
            raise
        finally:
            bar.close()


def _mean_over_data_parallel(value: torch.Tensor) -> torch.Tensor:
    """The global-batch value of a per-rank mean (every DP rank holds the same number of examples)."""
    import torch.distributed as dist

    import mpu

    if not (dist.is_available() and dist.is_initialized()) or mpu.get_data_parallel_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    return value / mpu.get_data_parallel_world_size()


def steps_per_epoch(micro_batches_per_epoch: int, grad_acc: int) -> int:
    return micro_batches_per_epoch // grad_acc


def total_train_steps(train_iters: int, epochs: int, micro_batches_per_epoch: int, grad_acc: int) -> int:
    per_epoch = steps_per_epoch(micro_batches_per_epoch, grad_acc)
    if train_iters is not None and train_iters > 0:
        return train_iters
    if per_epoch == 0:
        raise ValueError(f"the training set gives {micro_batches_per_epoch} micro-batches per data-parallel rank, fewer "
                         f"than --gradient-accumulation-steps {grad_acc}: lower --batch-size or the accumulation")
    return per_epoch * epochs
