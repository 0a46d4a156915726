"""Where a training step's wall time goes, measured without torch.profiler.

    python benchmarks/step_breakdown.py [--shape 8,128,32] [--steps 5] [--threads 2] [--tiny]

Why not the profiler alone: on this project's CPUs it inflates memory-bound ops several-fold. Under
``torch.profiler`` the embedding backward's ``fill_`` of a [26240, 512] gradient read 9.9 ms; timed by hooks in
the same step, that whole backward (zero-fill, index_add, accumulate) takes 1.6-1.9 ms. Ranking ops by profiler
self time therefore over-weights copies and fills (benchmarks/RESULTS.md, third session).

What it does: one step of our training path (``benchmarks.workloads.OursTrainStep``: DeepSpeed engine, client
AdamW, clipping, as ``finetune_cpm2.py`` runs it) with ``perf_counter`` around (1) every oneDNN GEMM of
``mpu.fast_linear`` (incl. the transposed-operand copy of weight-gradient GEMMs), grouped by shape, (2) the
engine's forward, backward and step, and (3) each module kind's forward (hooks; CPU ops are synchronous, so wall
time between hooks is the work). Prints a table, and ``--json PATH`` writes it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from typing import Dict

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

MODULE_KINDS = ("Attention", "GatedGeluFeedForward", "RMSNorm", "SelfAttentionLayer", "CrossAttentionLayer",
                "FeedForwardLayer", "Stack")


class _Clock:
    """Accumulates GEMM seconds (``gemm``) and per-key (seconds, GEMM seconds inside) while ``on``."""

    def __init__(self) -> None:
        self.on, self.gemm = False, 0.0
        self.gemm_by_shape: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0])  # seconds, FLOPs
        self.spans: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])

    def timed_gemm(self, gemm):
        def run(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = gemm(x, weight)
            seconds = time.perf_counter() - start
            self.gemm += seconds
            if self.on:
                m, k, n = x.numel() // x.size(-1), x.size(-1), weight.size(0)
                key = f"M={m} K={k} N={n}" + ("" if x.is_contiguous() else " (A transposed: copied first)")
                self.gemm_by_shape[key][0] += seconds
                self.gemm_by_shape[key][1] += 2 * m * k * n
            return y
        return run

    def timed_matmul(self, matmul):
        """The same for ``mpu.onednn_matmul.matmul`` / ``addmatmul_`` (weight gradients, attention's batched
        GEMMs): the last two arguments are the operands."""
        def run(*args: torch.Tensor) -> torch.Tensor:
            a, b = args[-2:]
            start = time.perf_counter()
            y = matmul(*args)
            seconds = time.perf_counter() - start
            self.gemm += seconds
            if self.on:
                batch = a.size(0) if a.dim() == 3 else 1
                m, k, n = a.size(-2), a.size(-1), b.size(-1)
                layout = "".join("T" if not t.is_contiguous() else "N" for t in (a, b))
                key = (f"matmul {'batched ' + str(batch) + 'x ' if a.dim() == 3 else ''}M={m} K={k} N={n} "
                       f"({layout})")
                self.gemm_by_shape[key][0] += seconds
                self.gemm_by_shape[key][1] += 2 * batch * m * k * n
            return y
        return run

    def wrap(self, owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def run(*args, **kwargs):
            start, gemm0 = time.perf_counter(), self.gemm
            out = inner(*args, **kwargs)
            if self.on:
                self.spans[key][0] += time.perf_counter() - start
                self.spans[key][1] += self.gemm - gemm0
            return out
        setattr(owner, name, run)

    def hook_module(self, module: torch.nn.Module, key: str) -> None:
        starts: Dict[int, tuple] = {}

        def pre(mod, _inputs):
            starts[id(mod)] = (time.perf_counter(), self.gemm)

        def post(mod, _inputs, _output):
            start, gemm0 = starts.pop(id(mod))
            if self.on:
                self.spans[key][0] += time.perf_counter() - start
                self.spans[key][1] += self.gemm - gemm0
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def breakdown(shape: tuple[int, int, int], steps: int, tiny: bool) -> Dict[str, object]:
    from benchmarks.workloads import OursTrainStep, make_batch
    from model import EncDecModel
    from mpu import fast_linear, onednn_matmul

    common.init_single_process_distributed()
    cfg = common.tiny_config() if tiny else common.speed_config()
    torch.manual_seed(0)
    model = EncDecModel(cfg)
    clock = _Clock()
    fast_linear._onednn = clock.timed_gemm(fast_linear._onednn)
    onednn_matmul.matmul = clock.timed_matmul(onednn_matmul.matmul)
    onednn_matmul.addmatmul_ = clock.timed_matmul(onednn_matmul.addmatmul_)
    for module in model.modules():
        if type(module).__name__ in MODULE_KINDS:
            clock.hook_module(module, "forward of " + type(module).__name__)
    b, le, ld = shape
    step = OursTrainStep(model, micro_batch_size=b)
    batch = make_batch(cfg, b, le, ld, seed=1)
    for name in ("forward", "backward", "step"):
        clock.wrap(step.engine, name, f"engine.{name}")
    for _ in range(2):  # warm-up: allocator, oneDNN kernel selection, optimizer state
        step(batch)
    clock.on = True
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    clock.on = False
    per_step = lambda seconds: round(seconds / steps * 1e3, 2)  # noqa: E731
    flops = common.train_flops(cfg, b, le, ld)
    gemm_seconds = sum(s for s, _ in clock.gemm_by_shape.values())
    return {
        "shape": {"batch": b, "enc_len": le, "dec_len": ld}, "steps": steps, "threads": torch.get_num_threads(),
        "step_ms_median": round(statistics.median(times) * 1e3, 2), "train_gflop": round(flops / 1e9, 2),
        "gemm_ms": per_step(gemm_seconds),
        "gemm_gflop_per_s": round(sum(f for _, f in clock.gemm_by_shape.values()) / gemm_seconds / 1e9, 1),
        "spans_ms": {k: {"total": per_step(s), "gemm": per_step(g), "other": per_step(s - g)}
                     for k, (s, g) in sorted(clock.spans.items(), key=lambda kv: -kv[1][0])},
        "gemm_by_shape": {k: {"ms": per_step(s), "gflop_per_s": round(f / s / 1e9, 1)}
                          for k, (s, f) in sorted(clock.gemm_by_shape.items(), key=lambda kv: -kv[1][0])},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,128,32", help="batch,encoder length,decoder length")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="smoke-test model (numbers meaningless)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from training.allocator import reexec_with_tuned_malloc

    reexec_with_tuned_malloc(force=True)  # the allocator settings finetune_cpm2.py runs with on CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        parser.error("--shape needs three integers: batch,encoder length,decoder length")
    result = breakdown(shape, args.steps, args.tiny)
    print(f"step {result['step_ms_median']} ms (median of {args.steps}); oneDNN GEMMs {result['gemm_ms']} ms per "
          f"step at {result['gemm_gflop_per_s']} GFLOP/s; model {result['train_gflop']} GFLOP per step")
    for key, span in result["spans_ms"].items():
        print(f"  {key:36s} {span['total']:8.2f} ms   GEMM {span['gemm']:8.2f}   other {span['other']:8.2f}")
    print("  GEMMs by shape (linear: x [M, K] @ W^T [K, N]; matmul: [M, K] @ [K, N] with each operand contiguous (N) "
          "or transposed (T)):")
    for key, gemm in list(result["gemm_by_shape"].items())[:24]:
        print(f"    {key:62s} {gemm['ms']:8.2f} ms  {gemm['gflop_per_s']:7.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    common.exit_after(main)
