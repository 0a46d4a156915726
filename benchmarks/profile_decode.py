"""Profiling helper for the decode fast path (not the official harness; see bench_cpu.py for that).

Times ours vs the HF twin (benchmarks/hf_peer.py) on the issue-8 generate workload, alternating in one process
(wall and process-CPU medians), and optionally prints torch.profiler top ops for each side.

    python benchmarks/profile_decode.py --threads 1 --reps 5 --beams 1 4 [--profile] [--new 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import speed_config  # noqa: E402
from benchmarks.hf_peer import build_pair  # noqa: E402
from benchmarks.workloads import hf_generate, make_batch, ours_generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = speed_config()
    ours, hf = build_pair(cfg)
    ours.eval(), hf.eval()
    batch = make_batch(cfg, args.batch, 64, 1, seed=2)
    ids, mask = batch["enc_input_ids"], batch["enc_attention_mask"]
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    for beams in args.beams:
        sides = {"ours": lambda: ours_generate(ours, ids, mask, new_tokens=args.new, beams=beams),
                 "hf": lambda: hf_generate(hf, ids, mask, new_tokens=args.new, beams=beams)}
        outs = {name: fn() for name, fn in sides.items()}  # warm-up
        wall = {n: [] for n in sides}
        cpu = {n: [] for n in sides}
        for rep in range(args.reps):
            for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                c0, w0 = time.process_time(), time.perf_counter()
                sides[name]()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        same = (outs["ours"] == outs["hf"]).float().mean().item()
        tok = args.batch * args.new
        mo, mh = statistics.median(wall["ours"]), statistics.median(wall["hf"])
        co, ch = statistics.median(cpu["ours"]), statistics.median(cpu["hf"])
        print(f"beams {beams}: ours {tok / mo:.1f} tok/s ({mo * 1e3:.0f} ms), HF {tok / mh:.1f} tok/s "
              f"({mh * 1e3:.0f} ms), ratio wall {mh / mo:.2f} cpu {ch / co:.2f}, same tokens {same:.3f}, "
              f"load {os.getloadavg()[0]:.2f}")
        print("   ours wall", [round(x, 3) for x in wall["ours"]], "hf wall", [round(x, 3) for x in wall["hf"]])
        if args.profile:
            for name, fn in sides.items():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    fn()
                print(f"--- {name}, beams {beams}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
