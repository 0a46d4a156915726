"""`--do-eval --random-init` of the tiny model over the real public samples in ../shared/data: one prediction per
labelled example, and metrics.json recomputed from predictions.jsonl by independent code in this test."""
from __future__ import annotations

import collections
import json

import pytest

from tests.training.helpers import TINY_CONFIG, run_finetune

# Encoder inputs are truncated to 128 tokens (a count is logged) to keep CPU attention cheap: every example is
# still scored; the full C3 length (768) costs minutes of O(L^2) attention on 2 cores.
CASES = {
    # task: (path under shared/data, extra flags)
    "ccpm": ("ccpm/valid.jsonl", ["--enc-seq-length", "128"]),
    "c3": ("c3/c3-d-dev.json", ["--enc-seq-length", "128"]),
    "math": ("math23k/test23k_processed.json", ["--out-seq-length", "6"]),
    "adgen": ("adgen/dev.json", ["--out-seq-length", "6"]),
}


def _independent_metric(task: str, preds: list[dict]) -> tuple[str, float]:
    if task in ("ccpm", "c3"):
        return "accuracy", sum(p["prediction"] == p["reference"] for p in preds) / len(preds)
    if task == "adgen":
        grams = [p["prediction"][i:i + 4] for p in preds for i in range(len(p["prediction"]) - 3)]
        distinct = len(set(grams)) / len(grams) if grams else 0.0
        return "distinct-4", distinct
    if task == "math":
        from fractions import Fraction

        def value(expr: str):
            # An independent evaluator for the test only: Fraction arithmetic over a tiny token grammar.
            import re

            expr = expr.replace("^", "**").replace("[", "(").replace("]", ")")
            expr = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", expr)
            if not re.fullmatch(r"[0-9.+\-*/() ]+", expr or "x"):
                return None
            tokens = re.findall(r"\d+(?:\.\d+)?|\*\*|[-+*/()]", expr)
            py = "".join(f"Fraction('{t}')" if t[0].isdigit() else t for t in tokens)
            try:
                return float(eval(py, {"__builtins__": {}}, {"Fraction": Fraction}))  # test-only, whitelisted chars
            except Exception:
                return None

        ok = 0
        for p in preds:
            a, b = value(p["prediction"]), value(p["reference"].split("=", 1)[-1])
            ok += a is not None and b is not None and abs(a - b) < 1e-4
        return "value_accuracy", ok / len(preds)
    raise KeyError(task)


@pytest.mark.parametrize("task", sorted(CASES))
def test_eval_over_real_sample(task, shared_data, cn_vocab, tmp_path):
    rel, extra = CASES[task]
    save = tmp_path / task
    run_finetune(["--model-config", str(TINY_CONFIG), "--tokenizer-path", str(cn_vocab), "--data-name", task,
                  "--data-path", str(shared_data / rel), "--save", str(save), "--random-init", "--do-eval",
                  "--eval-batch-size", "64", "--num-workers", "0", *extra], timeout=600)
    preds = [json.loads(line) for line in open(save / "test" / "predictions.jsonl", encoding="utf-8")]
    metrics = json.loads((save / "test" / "metrics.json").read_text())
    labelled = [p for p in preds if p["reference"] is not None]
    print(f"{task}: {len(preds)} predictions, {len(labelled)} labelled, metrics {metrics}")
    assert len(preds) == metrics["num_examples"] and len(labelled) == len(preds)
    assert len({p["id"] for p in preds}) == len(preds)  # one prediction per example, none duplicated
    name, value = _independent_metric(task, preds)
    assert metrics[name] == pytest.approx(value, abs=1e-6), (name, metrics)
