"""Shared pieces of the benchmarks: model sizes, machine facts, the matmul peak, alternating timers, FLOP counts.

Method (SPEC §9): ours and the peer run in ONE process on the same config, weights and inputs; their runs
alternate (ours, peer, peer, ours, ...) so that the machine's drift hits both alike; every figure is a median
over repetitions after warm-up. Memory figures come from fresh processes, because peak RSS never falls.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import EncDecConfig  # noqa: E402

VOCAB = 26240  # the Chinese CPM-2 vocab (bpe_cn)
DATE_OF_RECORD = "2026-11-27"


# -- model sizes ---------------------------------------------------------------------------------------------------

def speed_config() -> EncDecConfig:
    """Throughput entries: CPM-2 architecture at T5-small width, 6+6 layers (~65M parameters)."""
    return _config(d_model=512, d_ff=1024, d_kv=64, num_heads=8, num_layers=6)


def memory_config() -> EncDecConfig:
    """prompt_memory: >= 100M parameters (~172M), so weights and optimizer state dominate the footprint."""
    return _config(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=8)


def tiny_config() -> EncDecConfig:
    """Smoke test only: every code path, seconds to run, numbers meaningless."""
    return _config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab=512)


def _config(*, d_model: int, d_ff: int, d_kv: int, num_heads: int, num_layers: int, vocab: int = VOCAB,
            ) -> EncDecConfig:
    # init std 0.02 (not CPM-2's 0.001): keeps activations and gradients far from fp32 denormals, whose slow
    # path would time the arithmetic unit's microcode rather than either implementation.
    cfg = EncDecConfig(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=num_heads, num_layers=num_layers,
                       dropout_rate=0.0, init_method_std=0.02)
    cfg.vocab_size = vocab
    return cfg


def count_params(cfg: EncDecConfig) -> int:
    d, f, inner, v = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    attn, ff = 4 * d * inner, 3 * d * f
    enc = cfg.num_layers * (attn + ff + 2 * d)
    dec = cfg.num_decoder_layers * (2 * attn + ff + 3 * d)
    return 2 * v * d + enc + dec + 2 * d + 2 * cfg.relative_attention_num_buckets * cfg.num_heads


# -- FLOPs ---------------------------------------------------------------------------------------------------------

FLOPS_FORMULA = (
    "train FLOPs = 3 x forward GEMM FLOPs (2mnk each; padding counted); with Te = B*Le, Td = B*Ld, I = H*dk:\n"
    "  encoder x Lenc: 2*Te*d*3I (QKV) + 2*2*B*H*Le^2*dk (QK^T, AV) + 2*Te*I*d (o) + 3*2*Te*d*dff (wi_0, wi_1, wo)\n"
    "  decoder x Ldec: 2*Td*d*3I + 2*2*B*H*Ld^2*dk + 2*Td*I*d (self) + 2*Td*d*I (cross q) + 2*Te*d*2I (cross kv)\n"
    "                  + 2*2*B*H*Ld*Le*dk (cross QK^T, AV) + 2*Td*I*d (cross o) + 3*2*Td*d*dff (FF)\n"
    "  + 2*Td*d*V (lm_head);   MFU = train FLOPs / median step seconds / GEMM peak measured in the same run\n"
    "  (fp32 2048^3 on CPU, bf16 8192^3 on GPU)"
)


def forward_flops(cfg: EncDecConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """Matmul FLOPs (2mnk) of one forward pass; see FLOPS_FORMULA."""
    d, f, h, dk, v = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.vocab_size
    inner = h * dk
    te, td = batch * enc_len, batch * dec_len
    enc_layer = (2 * te * d * 3 * inner + 2 * 2 * batch * h * enc_len * enc_len * dk + 2 * te * inner * d
                 + 3 * 2 * te * d * f)
    dec_layer = (2 * td * d * 3 * inner + 2 * 2 * batch * h * dec_len * dec_len * dk + 2 * td * inner * d
                 + 2 * td * d * inner + 2 * te * d * 2 * inner + 2 * 2 * batch * h * dec_len * enc_len * dk
                 + 2 * td * inner * d + 3 * 2 * td * d * f)
    return cfg.num_layers * enc_layer + cfg.num_decoder_layers * dec_layer + 2 * td * d * v


def attention_flops(cfg: EncDecConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """The QK^T and AV part of `forward_flops` (encoder self, decoder self, cross)."""
    per_pair = 2 * 2 * batch * cfg.num_heads * cfg.d_kv  # two GEMMs, per (query, key) pair
    return per_pair * (cfg.num_layers * enc_len * enc_len
                       + cfg.num_decoder_layers * (dec_len * dec_len + dec_len * enc_len))


def train_flops(cfg: EncDecConfig, batch: int, enc_len: int, dec_len: int) -> int:
    """Forward + backward (backward = 2x forward: grads of inputs and of weights)."""
    return 3 * forward_flops(cfg, batch, enc_len, dec_len)


# -- machine -------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str = "cpu") -> Dict[str, object]:
    info: Dict[str, object] = {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # training/allocator.py
    }
    for pkg in ("deepspeed", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    flags = _cpu_flags()
    info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# -- timing --------------------------------------------------------------------------------------------------------

def _no_sync() -> None:
    return None


def matmul_peak(n: int = 2048, reps: int = 5, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                sync: Callable[[], None] = _no_sync) -> Dict[str, float]:
    """Median FLOP/s of n x n x n GEMMs after one warm-up: the machine's attainable matmul peak.

    On CPU fp32 torch's default GEMM (`a @ b`, MKL), oneDNN's linear (the kernel `mpu.fast_linear` uses) and
    oneDNN's matmul (`mpu.onednn_matmul`, when built) are timed and the fastest one is the peak: dividing by a
    slower library's peak would overstate MFU (it read above 1.0 once our layers moved to oneDNN).
    """
    a = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up (allocations, kernel selection, weight packing)
        sync()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    c = a @ b
    medians = {"torch.matmul": timed(lambda: torch.matmul(a, b, out=c))}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if device == "cpu" and dtype == torch.float32 and onednn is not None:
        try:
            medians["onednn_linear"] = timed(lambda: onednn(a, b, None, "none", [], ""))
        except RuntimeError:  # a torch build without oneDNN linear: the matmul peak stands
            pass
        from mpu import onednn_matmul

        if onednn_matmul.usable(a, b):  # the extension our training GEMMs use (mpu/onednn_matmul.py)
            medians["onednn_matmul"] = timed(lambda: onednn_matmul.matmul(a, b))
    kernel, med = min(medians.items(), key=lambda kv: kv[1])
    return {"flops_per_s": 2 * n ** 3 / med, "n": n, "reps": reps, "median_s": med, "dtype": str(dtype),
            "kernel": kernel, "per_kernel_flops_per_s": {k: 2 * n ** 3 / v for k, v in medians.items()}}


def alternate(runners: Dict[str, Callable[[], float]], *, reps: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run each side `warmup` times, then `reps` rounds with the order flipped every round (A B, B A, ...).

    Each runner returns the seconds of the work it timed (so set-up such as zero_grad outside the measured
    region is not counted). Returns the list of timed seconds per side.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start_cpu = time.process_time()
            seconds[name].append(runners[name]())
            cpu[name].append(time.process_time() - start_cpu)
    # Process CPU seconds (all threads) of each call: unlike wall time it does not grow while other processes
    # hold the cores, so with 1 thread it is the steadier measure on a shared machine.
    seconds.update({f"{name}_cpu": values for name, values in cpu.items()})
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(ours: float, peer: float) -> Optional[float]:
    return round(ours / peer, 3) if peer else None


# -- processes -----------------------------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries that over fork + exec, so a worker started by a big parent reports
    the parent's peak (both memory modes then read the same number). VmHWM belongs to the current address space.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def run_json_subprocess(args: Sequence[str], *, timeout: float = 900.0) -> Dict[str, object]:
    """Run `python ARGS` in a fresh process (repo root as cwd) and parse the JSON on its last stdout line."""
    # The parent's single-process rendezvous (RANK, MASTER_PORT, ...) must not leak: the child binds its own port.
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.setdefault("DS_ACCELERATOR", "cpu")
    done = subprocess.run([sys.executable, *args], cwd=str(ROOT), capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {' '.join(args)} failed (rc {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def init_single_process_distributed() -> None:
    """A world of one for DeepSpeed, the way finetune_cpm2.py sets it up (training.setup.init_distributed):
    RANK/WORLD_SIZE/... filled in, gloo on CPU, DeepSpeed's shm-comm JIT build skipped."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    import logging

    from training.setup import init_distributed

    init_distributed(1)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_after(main: Callable[[], int]) -> NoReturn:
    """``sys.exit(main())`` with the process groups torn down in between: their threads are joined before the
    interpreter exits, which otherwise could abort the benchmark process after its results (docs/reliability.md
    section 7)."""
    from training.setup import teardown

    exit_code = main()
    teardown()
    sys.exit(exit_code)
