"""Render a bench_cpu.py JSON as the Markdown table used in benchmarks/RESULTS.md.

    python benchmarks/report.py RESULT.json [RESULT2.json ...]
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def table(result: Dict[str, object]) -> str:
    m = result["machine"]
    head = (f"Run `{result['mode']}` on {result['date']}: {m['cpu']} ({m['cpus']} CPUs, {m['torch_threads']} torch "
            f"threads), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}; fp32 GEMM "
            f"peak {result['fp32_gemm_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (start), "
            f"{result.get('fp32_gemm_peak_end', {}).get('flops_per_s', float('nan')) / 1e9:.1f} (end).\n\n")
    rows: List[str] = ["| entry | unit | ours | peer | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for name, e in result["entries"].items():
        rows.append(f"| {name} | {e['unit']} | {_fmt(e['ours'])} | {_fmt(e['peer'])} | {_fmt(e['ratio'])} | "
                    f"{e['target']} | {'yes' if e['met'] else '**no**'} |")
        if name == "train":
            for shape, s in e["shapes"].items():
                rows.append(f"| train/{shape} (B {s['batch']}, Le {s['enc_len']}, Ld {s['dec_len']}) | tokens/s | "
                            f"{_fmt(s['ours_tokens_per_s'])} | {_fmt(s['peer_tokens_per_s'])} | {_fmt(s['ratio'])} "
                            f"(CPU-time ratio {_fmt(s.get('ratio_by_cpu_time'))}) | | |")
        if name == "mfu":
            for shape, s in e["per_shape"].items():
                rows.append(f"| mfu/{shape} ({s['train_gflop']} GFLOP/step) | fraction of peak | {_fmt(s['ours'])} | "
                            f"{_fmt(s['peer'])} | | | |")
    return head + "\n".join(rows) + "\n"


def main(argv: List[str]) -> int:
    for path in argv:
        with open(path, encoding="utf-8") as f:
            print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
