"""CPU benchmarks of cpm2-finetune against Hugging Face T5 with identical config and weights (SPEC §9).

    python benchmarks/bench_cpu.py [--quick | --tiny] --json PATH [--only train,mfu,...] [--profile FILE]
                                   [--sweep] [--plot-dir DIR]

Entries (ratio = ours / peer, higher is better; prompt_memory: full / prompt):
  train            tokens/s (encoder + decoder tokens) of a full training step: ours through DeepSpeed
                   (training.engine.build_engine, ZeRO 0 fp32) and Trainer.train_step vs HF T5 + AdamW; two shapes,
                   the entry's ratio is the smaller one.
  mfu              analytic train FLOPs / step time / fp32 GEMM peak measured in this run (same step timings).
  generate_greedy  new tokens/s, batch 8 x 64 encoder tokens, exactly 64 new tokens per input; ours vs HF generate().
  generate_beam4   the same with 4 beams (tokens counted once per input, not per beam).
  prompt_memory    peak RSS of a training step, full fine-tuning vs prompt tuning (fix_model), each in a fresh process.
  tokenizer        benchmarks.bench_tokenizer.run() (cold processes, ours vs the original algorithm).
Method: benchmarks/common.py. Results: benchmarks/RESULTS.md.
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
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # the allocator settings finetune_cpm2.py runs with on CPU (both sides share the process)
    from training.allocator import reexec_with_tuned_malloc

    reexec_with_tuned_malloc(force=True)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import alternate, median, ratio  # noqa: E402

ENTRIES = ("train", "mfu", "generate_greedy", "generate_beam4", "prompt_memory", "tokenizer")
TARGETS = {  # entry -> (field the target applies to, minimum)
    "train": ("ratio", 1.0), "mfu": ("ours", 0.7), "generate_greedy": ("ratio", 3.0),
    "generate_beam4": ("ratio", 2.0), "prompt_memory": ("ratio", 2.0), "tokenizer": ("ratio", 2.0),
}
logger = logging.getLogger("bench")


@dataclass
class Plan:
    """Sizes and repetitions of one run (`--quick`, default, `--tiny`)."""
    mode: str
    train_shapes: Dict[str, Tuple[int, int, int]]  # name -> (batch, enc_len, dec_len)
    train_reps: int
    gen_shape: Tuple[int, int, int]  # (batch, enc_len, new tokens)
    gen_reps: int
    memory_shape: Tuple[int, int, int, int]  # (batch, prompt_len, text_len, dec_len)
    tokenizer_repeats: int
    peak_reps: int
    warmup: int = 1
    sweep_batches: Tuple[int, ...] = (2, 4, 8, 16)
    sweep_shape: Tuple[int, int] = (64, 16)  # (enc_len, dec_len) of the training sweep
    tiny: bool = False
    notes: List[str] = field(default_factory=list)


def make_plan(quick: bool, tiny: bool) -> Plan:
    if tiny:
        return Plan("tiny", {"finetune": (4, 16, 4), "gentask": (2, 16, 8)}, 1, (2, 8, 8), 1, (2, 4, 8, 4),
                    1, 2, warmup=1, sweep_batches=(1, 2), sweep_shape=(8, 4), tiny=True)
    shapes = {"finetune": (32, 64, 4), "gentask": (8, 128, 32)}
    if quick:
        return Plan("quick", shapes, 3, (8, 64, 64), 3, (4, 100, 28, 4), 1, 5, sweep_batches=(2, 4, 8, 16))
    return Plan("full", shapes, 5, (8, 64, 64), 5, (4, 100, 28, 4), 3, 7)


def model_config(plan: Plan):
    return common.tiny_config() if plan.tiny else common.speed_config()


def _entry(name: str, ours: float, peer: float, unit: str, **extra) -> Dict[str, object]:
    value = ratio(ours, peer)
    field_, minimum = TARGETS[name]
    checked = value if field_ == "ratio" else ours
    return {"ours": round(ours, 4), "peer": round(peer, 4), "ratio": value, "unit": unit,
            "target": f"{field_} >= {minimum}", "met": bool(checked is not None and checked >= minimum), **extra}


# -- train + mfu ---------------------------------------------------------------------------------------------------

def bench_train(plan: Plan, pair) -> Dict[str, Dict[str, object]]:
    """The `train` entry; its per-shape step times stay in it for :func:`mfu_entry`, which needs the peak of the
    whole run (measured again at the end)."""
    from benchmarks.workloads import HFTrainStep, OursTrainStep, make_batch, timed, tokens_in

    cfg = model_config(plan)
    ours_model, hf = pair
    first_batch = next(iter(plan.train_shapes.values()))[0]
    ours_step = OursTrainStep(ours_model, micro_batch_size=first_batch)
    hf_step = HFTrainStep(hf)
    shapes: Dict[str, Dict[str, object]] = {}
    for name, (b, le, ld) in plan.train_shapes.items():
        batch = make_batch(cfg, b, le, ld, seed=1)
        seconds = alternate({"ours": timed(ours_step, batch), "peer": timed(hf_step, batch)},
                            reps=plan.train_reps, warmup=plan.warmup)
        flops = common.train_flops(cfg, b, le, ld)
        t_ours, t_peer = median(seconds["ours"]), median(seconds["peer"])
        shapes[name] = {
            "batch": b, "enc_len": le, "dec_len": ld, "tokens_per_step": tokens_in(batch),
            "ours_tokens_per_s": round(tokens_in(batch) / t_ours, 1),
            "peer_tokens_per_s": round(tokens_in(batch) / t_peer, 1),
            "ratio": ratio(t_peer, t_ours), "ours_step_s": seconds["ours"], "peer_step_s": seconds["peer"],
            "ratio_by_cpu_time": ratio(median(seconds["peer_cpu"]), median(seconds["ours_cpu"])),
            "ours_step_cpu_s": seconds["ours_cpu"], "peer_step_cpu_s": seconds["peer_cpu"],
            "train_gflop": round(flops / 1e9, 2), "train_flop": flops,
        }
        logger.info("train %s: ours %.0f tok/s, peer %.0f tok/s, ratio %s", name,
                    shapes[name]["ours_tokens_per_s"], shapes[name]["peer_tokens_per_s"], shapes[name]["ratio"])
    worst = min(shapes, key=lambda n: shapes[n]["ratio"])
    train = _entry("train", shapes[worst]["ours_tokens_per_s"], shapes[worst]["peer_tokens_per_s"], "tokens/s",
                   shape=worst, shapes=shapes, code_path=ours_step.code_path, params=common.count_params(cfg))
    train["ratio"] = shapes[worst]["ratio"]
    train["met"] = train["ratio"] >= TARGETS["train"][1]
    return train


def mfu_entry(train: Dict[str, object], peak: float) -> Dict[str, object]:
    """MFU of both sides at every train shape from the median step times of `train`, against `peak` FLOP/s.

    Called once the run is over with the better of the start and end peak measurements: a peak measured while a
    neighbour held the machine would make every MFU look higher than it is (run D of 2026-11-28 was reported
    against its start peak, 443.7 GFLOP/s, while its end peak was 467.8).
    """
    shapes = train["shapes"]
    for s in shapes.values():
        s["ours_mfu"] = round(s["train_flop"] / median(s["ours_step_s"]) / peak, 4)
        s["peer_mfu"] = round(s["train_flop"] / median(s["peer_step_s"]) / peak, 4)
    worst = min(shapes, key=lambda n: shapes[n]["ours_mfu"])
    return _entry("mfu", shapes[worst]["ours_mfu"], shapes[worst]["peer_mfu"], "fraction of fp32 GEMM peak",
                  shape=worst, per_shape={n: {"ours": s["ours_mfu"], "peer": s["peer_mfu"],
                                              "train_gflop": s["train_gflop"]} for n, s in shapes.items()},
                  peak_gflop_per_s=round(peak / 1e9, 2), peak_rule="the better of the start and end measurements",
                  formula=common.FLOPS_FORMULA)


# -- generation ----------------------------------------------------------------------------------------------------

def bench_generate(plan: Plan, pair, beams: int) -> Dict[str, object]:
    from benchmarks.workloads import hf_generate, make_batch, ours_generate

    cfg = model_config(plan)
    ours_model, hf = pair
    b, le, new = plan.gen_shape
    batch = make_batch(cfg, b, le, 1, seed=2)
    ids, mask = batch["enc_input_ids"], batch["enc_attention_mask"]
    outputs = {}

    def runner(side: str, fn):
        def run() -> float:
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            if out.shape != (b, new):
                raise RuntimeError(f"{side} generated {tuple(out.shape)} tokens, expected {(b, new)}")
            outputs[side] = out
            return elapsed
        return run

    from mpu import fast_linear

    # As an evaluation does (training/evaluation.py): the weights are packed for oneDNN once per evaluation, not
    # per batch. A lone generate() call packs its own (RESULTS.md gives that figure too).
    with fast_linear.packed_weights():
        seconds = alternate({
            "ours": runner("ours", lambda: ours_generate(ours_model, ids, mask, new_tokens=new, beams=beams)),
            "peer": runner("peer", lambda: hf_generate(hf, ids, mask, new_tokens=new, beams=beams)),
        }, reps=plan.gen_reps, warmup=plan.warmup)
    same = (outputs["ours"] == outputs["peer"]).float().mean().item()
    t_ours, t_peer = median(seconds["ours"]), median(seconds["peer"])
    name = "generate_greedy" if beams == 1 else f"generate_beam{beams}"
    logger.info("%s: ours %.3f s, peer %.3f s", name, t_ours, t_peer)
    return _entry(name, b * new / t_ours, b * new / t_peer, "new tokens/s (per input, not per beam)",
                  batch=b, enc_len=le, new_tokens=new, beams=beams, ours_s=seconds["ours"], peer_s=seconds["peer"],
                  ratio_by_cpu_time=ratio(median(seconds["peer_cpu"]), median(seconds["ours_cpu"])),
                  same_tokens_fraction=round(same, 4))


# -- memory (one fresh process per mode) ---------------------------------------------------------------------------

def bench_prompt_memory(plan: Plan, threads: Optional[int]) -> Dict[str, object]:
    runs = {}
    for mode in ("full", "prompt"):
        args = [str(pathlib.Path(__file__).resolve()), "--memory-worker", mode] + (["--tiny"] if plan.tiny else []) \
            + ([f"--threads={threads}"] if threads else [])
        runs[mode] = common.run_json_subprocess(args)
        logger.info("prompt_memory %s: peak RSS %.0f MiB", mode, runs[mode]["peak_rss_mib"])
    full, prompt = runs["full"]["peak_rss_mib"], runs["prompt"]["peak_rss_mib"]
    # ours = full, peer = prompt, so that ratio = full / prompt (how much less prompt tuning needs).
    entry = _entry("prompt_memory", full, prompt, "peak RSS MiB (ours = full fine-tuning, peer = prompt tuning)",
                   runs=runs)
    return entry


def memory_worker(mode: str, plan: Plan) -> Dict[str, object]:
    """Runs in a fresh process: build the >= 100M model, choose what trains, two training steps, report peak RSS."""
    from benchmarks.workloads import OursTrainStep, make_batch
    from data_utils.prompt import PromptConfig
    from model import EncDecModel
    from training.prompt_tuning import set_trainable

    common.init_single_process_distributed()
    cfg = common.tiny_config() if plan.tiny else common.memory_config()
    b, p, text, ld = plan.memory_shape
    raw = {"enc": {"prompt_len": p}, "fix_model": mode == "prompt"}
    prompt_cfg = PromptConfig.from_dict(raw, source="bench_cpu prompt_memory")
    rss_start = common.current_rss_mib()
    torch.manual_seed(0)
    model = EncDecModel(cfg, parallel_output=True, prompt_config=prompt_cfg.raw)
    trainable, total = set_trainable(model, prompt_cfg)
    rss_model = common.current_rss_mib()
    step = OursTrainStep(model, micro_batch_size=b, prompt_only=mode == "prompt")
    batch = make_batch(cfg, b, p + text, ld, seed=3, prompt_len=p)
    start = time.perf_counter()
    for _ in range(2):  # AdamW state appears at the first step; the second runs with everything allocated
        loss = step(batch)
    return {"mode": mode, "peak_rss_mib": round(common.peak_rss_mib(), 1), "rss_at_start_mib": round(rss_start, 1),
            "rss_after_model_mib": round(rss_model, 1), "params": total, "trainable": trainable,
            "batch": b, "prompt_len": p, "enc_len": p + text, "dec_len": ld,
            "two_steps_s": round(time.perf_counter() - start, 2), "loss": float(loss)}


# -- tokenizer -----------------------------------------------------------------------------------------------------

def bench_tokenizer(plan: Plan) -> Dict[str, object]:
    from benchmarks import bench_tokenizer as tok

    if plan.tiny:
        texts = ["今天天气很好。", "我来到北京清华大学。", "CPM-2 是一个中文模型。"] * 20
        result = tok.run(texts, repeats=1)
    else:
        result = tok.run(repeats=plan.tokenizer_repeats)
    keep = {k: v for k, v in result.items() if k not in ("ours", "peer", "ratio", "machine", "date")}
    return _entry("tokenizer", float(result["ours"]), float(result["peer"]), "texts/s", **keep)


# -- profile and sweep ---------------------------------------------------------------------------------------------

def run_profile(plan: Plan, pair, path: str) -> None:
    """torch.profiler (CPU) of one training step and one decoding run of each side; top ops to `path`."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.workloads import HFTrainStep, OursTrainStep, hf_generate, make_batch, ours_generate

    cfg = model_config(plan)
    ours_model, hf = pair
    b, le, ld = plan.train_shapes["gentask"]
    batch = make_batch(cfg, b, le, ld, seed=1)
    ours_step, hf_step = OursTrainStep(ours_model, micro_batch_size=b), HFTrainStep(hf)
    gb, gle, _ = plan.gen_shape
    gbatch = make_batch(cfg, gb, gle, 1, seed=2)
    new = 16
    work = {
        "train step, ours": lambda: ours_step(batch), "train step, HF": lambda: hf_step(batch),
        f"greedy generate {new} tokens, ours": lambda: ours_generate(
            ours_model, gbatch["enc_input_ids"], gbatch["enc_attention_mask"], new_tokens=new, beams=1),
        f"greedy generate {new} tokens, HF": lambda: hf_generate(
            hf, gbatch["enc_input_ids"], gbatch["enc_attention_mask"], new_tokens=new, beams=1),
        f"beam-4 generate {new} tokens, ours": lambda: ours_generate(
            ours_model, gbatch["enc_input_ids"], gbatch["enc_attention_mask"], new_tokens=new, beams=4),
        f"beam-4 generate {new} tokens, HF": lambda: hf_generate(
            hf, gbatch["enc_input_ids"], gbatch["enc_attention_mask"], new_tokens=new, beams=4),
    }
    with open(path, "w", encoding="utf-8") as out:
        for title, fn in work.items():
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)
            out.write(f"=== {title} (train shape {plan.train_shapes['gentask']}, gen shape {plan.gen_shape}) ===\n")
            out.write(table + "\n\n")
            logger.info("profiled %s", title)


def run_sweep(plan: Plan, pair) -> Dict[str, object]:
    """Training tokens/s vs batch size (ours vs HF) for the plot; alternating, `plan.train_reps` reps each."""
    from benchmarks.workloads import HFTrainStep, OursTrainStep, make_batch, timed, tokens_in

    cfg = model_config(plan)
    ours_model, hf = pair
    le, ld = plan.sweep_shape
    ours_step, hf_step = OursTrainStep(ours_model, micro_batch_size=plan.sweep_batches[0]), HFTrainStep(hf)
    points = []
    for b in plan.sweep_batches:
        batch = make_batch(cfg, b, le, ld, seed=4)
        seconds = alternate({"ours": timed(ours_step, batch), "peer": timed(hf_step, batch)},
                            reps=max(2, plan.train_reps - 1), warmup=1)
        points.append({"batch": b, "ours": round(tokens_in(batch) / median(seconds["ours"]), 1),
                       "peer": round(tokens_in(batch) / median(seconds["peer"]), 1)})
        logger.info("sweep batch %d: %s", b, points[-1])
    return {"enc_len": le, "dec_len": ld, "points": points}


# -- main ----------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (finishes in under 10 minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes, 1 repetition (smoke test)")
    p.add_argument("--json", required=False, help="write the results here")
    p.add_argument("--only", default=",".join(ENTRIES), help=f"comma-separated subset of {','.join(ENTRIES)}")
    p.add_argument("--profile", help="also profile one train step / decoding run per side; top ops to this file")
    p.add_argument("--sweep", action="store_true", help="also measure train tokens/s vs batch size (for the plot)")
    p.add_argument("--plot-dir", help="write plot_*.png of the sweep here (needs --sweep)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = the CPU count); on a "
                   "shared machine 1 thread avoids OpenMP barrier stalls when another process takes a core")
    p.add_argument("--memory-worker", choices=("full", "prompt"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker is None and not args.json:
        p.error("--json PATH is required")
    unknown = sorted(set(args.only.split(",")) - set(ENTRIES))
    if unknown:
        p.error(f"--only: unknown entries {unknown}; choose from {', '.join(ENTRIES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    plan = make_plan(args.quick, args.tiny)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:  # before importing transformers: its import would raise this process's peak RSS
        print(json.dumps(memory_worker(args.memory_worker, plan)))
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    only = [e for e in ENTRIES if e in args.only.split(",")]
    started = time.time()
    peak = common.matmul_peak(512 if plan.tiny else 2048, plan.peak_reps)
    logger.info("fp32 GEMM peak %.1f GFLOP/s", peak["flops_per_s"] / 1e9)
    results: Dict[str, object] = {"machine": common.machine_info(), "date": common.machine_info()["date"],
                                  "mode": plan.mode, "plan": asdict(plan), "fp32_gemm_peak": peak, "entries": {}}
    entries: Dict[str, object] = results["entries"]
    needs_pair = any(e in only for e in ("train", "mfu", "generate_greedy", "generate_beam4")) \
        or args.profile or args.sweep
    pair = None
    if needs_pair:
        from benchmarks.hf_peer import build_pair, check_same_function
        from benchmarks.workloads import make_batch

        common.init_single_process_distributed()
        cfg = model_config(plan)
        pair = build_pair(cfg)
        probe = make_batch(cfg, 2, 16, 4, seed=9)
        results["peer_max_logit_diff"] = check_same_function(*pair, probe["enc_input_ids"], probe["dec_input_ids"])
        results["model"] = {**cfg.to_dict(), "params": common.count_params(cfg), "dtype": "float32"}
    # Generation first: training changes the weights (both sides alike, but then the tokens would differ).
    for beams, name in ((1, "generate_greedy"), (4, "generate_beam4")):
        if name in only:
            entries[name] = bench_generate(plan, pair, beams)
    train = bench_train(plan, pair) if "train" in only or "mfu" in only else None
    if train is not None and "train" in only:
        entries["train"] = train
    if args.sweep:
        results["sweep"] = run_sweep(plan, pair)
        if args.plot_dir:
            from benchmarks.plotting import plot_sweep

            results["plots"] = plot_sweep(results["sweep"], args.plot_dir, results["machine"])
    if args.profile:
        # After the timed entries: the profiled train steps build a second engine and optimizer state on the same
        # model (both sides), which slowed the train entries measured after them by ~15 % (2026-11-27 run).
        run_profile(plan, pair, args.profile)
    if "prompt_memory" in only:
        entries["prompt_memory"] = bench_prompt_memory(plan, args.threads)
    if "tokenizer" in only:
        entries["tokenizer"] = bench_tokenizer(plan)
    # Second peak measurement: the machine is shared, so keep the better of the two as "the peak".
    peak_end = common.matmul_peak(512 if plan.tiny else 2048, plan.peak_reps)
    results["fp32_gemm_peak_end"] = peak_end
    if train is not None and "mfu" in only:
        entries["mfu"] = mfu_entry(train, max(peak["flops_per_s"], peak_end["flops_per_s"]))
    results["wall_s"] = round(time.time() - started, 1)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    summary = {name: {k: e[k] for k in ("ours", "peer", "ratio", "unit", "target", "met")}
               for name, e in entries.items()}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    common.exit_after(main)
