"""GPU benchmarks (one CUDA device): bf16 training-step MFU of a ~1.5B-parameter CPM-2 and generation throughput,
ours vs Hugging Face T5 with identical config and weights, in one process, alternating, medians after warm-up.

    python benchmarks/bench_gpu.py [--json PATH] [--reps 10] [--batch 8 --enc-len 512 --dec-len 128]
    python benchmarks/bench_gpu.py --cpu-dry-run      # tiny model on CPU: checks the script, numbers meaningless

Ours trains through finetune_cpm2.py's path (DeepSpeed engine from training.engine with bf16, ZeRO 0, client
AdamW with fp32 master weights; Trainer.train_step). The peer is HF T5 the way HF's Trainer runs `--bf16`:
fp32 weights, torch.autocast(bf16) forward, fused AdamW. MFU = analytic matmul FLOPs (benchmarks/common.py
FLOPS_FORMULA) / median step time / the bf16 GEMM peak measured in this run (8192^3 matmuls).
Generation: bf16 weights on both sides, batch x 64 encoder tokens, exactly 64 new tokens (stopping disabled),
greedy and beam 4, tokens counted once per input. Prints one JSON object; finishes in under 5 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
import warnings
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

logger = logging.getLogger("bench_gpu")


def gpu_config(tiny: bool):
    from benchmarks import common

    if tiny:
        return common.tiny_config()
    # ~1.47B parameters: d 2048, d_ff 5120, 32 heads of 64, 12 + 12 layers, CPM-2 vocab.
    return common._config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=12)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--reps", type=int, default=10, help="timed training steps per side (after 2 warm-up steps)")
    p.add_argument("--gen-reps", type=int, default=5, help="timed generate calls per side and mode")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--enc-len", type=int, default=512)
    p.add_argument("--dec-len", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: tiny model on CPU, 1 repetition, to check that the script runs")
    return p.parse_args(argv)


def check_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise SystemExit("bench_gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine with "
                         "a CUDA build of torch, or use benchmarks/bench_cpu.py; --cpu-dry-run only checks the script.")
    return torch.device("cuda", 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    device = check_device(args.cpu_dry_run)
    if args.cpu_dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.reps, args.gen_reps, args.batch, args.enc_len, args.dec_len = 1, 1, 2, 16, 8
        args.gen_batch, args.new_tokens = 2, 4
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers

    from benchmarks import common
    from benchmarks.common import alternate, median, ratio
    from benchmarks.hf_peer import build_pair, check_same_function
    from benchmarks.workloads import (HFTrainStep, OursTrainStep, hf_generate, make_batch, ours_generate, timed,
                                      tokens_in)

    transformers.logging.set_verbosity_error()
    started = time.time()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak_n = 512 if args.cpu_dry_run else 8192
    peak = common.matmul_peak(peak_n, 2 if args.cpu_dry_run else 10, dtype=torch.bfloat16, device=str(device),
                              sync=sync)
    logger.info("bf16 GEMM peak %.1f TFLOP/s", peak["flops_per_s"] / 1e12)
    common.init_single_process_distributed()  # nccl on GPU, gloo on CPU (training.setup.init_distributed)
    cfg = gpu_config(args.cpu_dry_run)
    ours, hf = build_pair(cfg, device=device, dtype=torch.float32)  # built in fp32 on the host, then moved
    probe = make_batch(cfg, 2, 16, 4, device=device, seed=9)
    logit_diff = check_same_function(ours, hf, probe["enc_input_ids"], probe["dec_input_ids"])
    ours.to(torch.bfloat16)  # finetune_cpm2.py casts before building the engine (--bf16)
    results: Dict[str, object] = {"machine": common.machine_info(str(device)), "bf16_gemm_peak": peak,
                                  "model": {**cfg.to_dict(), "params": common.count_params(cfg)},
                                  "peer_max_logit_diff_fp32": logit_diff, "entries": {}}
    entries = results["entries"]

    # Generation (inference, bf16 weights on both sides), before training changes the weights.
    hf.to(torch.bfloat16)
    gen = make_batch(cfg, args.gen_batch, 64 if not args.cpu_dry_run else 8, 1, device=device, seed=2)
    for beams, name in ((1, "generate_greedy"), (4, "generate_beam4")):
        def run(fn):
            def timed_call() -> float:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                return time.perf_counter() - start
            return timed_call
        ids, mask, n = gen["enc_input_ids"], gen["enc_attention_mask"], args.new_tokens
        seconds = alternate({
            "ours": run(lambda: ours_generate(ours, ids, mask, new_tokens=n, beams=beams)),
            "peer": run(lambda: hf_generate(hf, ids, mask, new_tokens=n, beams=beams)),
        }, reps=args.gen_reps, warmup=1)
        rate = {k: args.gen_batch * n / median(v) for k, v in seconds.items()}
        entries[name] = {"ours": round(rate["ours"], 1), "peer": round(rate["peer"], 1),
                         "ratio": ratio(rate["ours"], rate["peer"]), "unit": "new tokens/s", "batch": args.gen_batch,
                         "new_tokens": n, "beams": beams, "ours_s": seconds["ours"], "peer_s": seconds["peer"]}
        logger.info("%s: %s", name, {k: entries[name][k] for k in ("ours", "peer", "ratio")})

    # Training step, bf16.
    hf.to(torch.float32)
    ours_step = OursTrainStep(ours, micro_batch_size=args.batch, bf16=True, device=device)
    hf_step = HFTrainStep(hf, fused=device.type == "cuda", autocast_dtype=torch.bfloat16)
    while True:  # halve the batch on out-of-memory (both sides always run the same batch)
        batch = make_batch(cfg, args.batch, args.enc_len, args.dec_len, device=device, seed=1)
        try:
            seconds = alternate({"ours": timed(ours_step, batch, sync), "peer": timed(hf_step, batch, sync)},
                                reps=args.reps, warmup=2)
            break
        except torch.cuda.OutOfMemoryError:
            if args.batch == 1:
                raise
            logger.warning("out of memory at batch %d; retrying with %d", args.batch, args.batch // 2)
            results.setdefault("notes", []).append(f"OOM at training batch {args.batch}, halved")
            args.batch //= 2
            del batch
            ours_step.engine.zero_grad()
            hf_step.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    flops = common.train_flops(cfg, args.batch, args.enc_len, args.dec_len)
    t = {k: median(v) for k, v in seconds.items()}
    entries["train_bf16"] = {
        "ours": round(tokens_in(batch) / t["ours"], 1), "peer": round(tokens_in(batch) / t["peer"], 1),
        "ratio": ratio(t["peer"], t["ours"]), "unit": "tokens/s", "batch": args.batch, "enc_len": args.enc_len,
        "dec_len": args.dec_len, "ours_step_s": seconds["ours"], "peer_step_s": seconds["peer"],
        "code_path": ours_step.code_path,
    }
    entries["mfu_bf16"] = {
        "ours": round(flops / t["ours"] / peak["flops_per_s"], 4), "peer": round(flops / t["peer"] / peak["flops_per_s"], 4),
        "ratio": ratio(t["peer"], t["ours"]), "unit": "fraction of measured bf16 GEMM peak",
        "train_tflop": round(flops / 1e12, 3), "peak_tflop_per_s": round(peak["flops_per_s"] / 1e12, 1),
        "formula": common.FLOPS_FORMULA,
    }
    if device.type == "cuda":
        results["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    results["wall_s"] = round(time.time() - started, 1)
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    from benchmarks import common

    common.exit_after(main)
