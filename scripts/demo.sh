#!/usr/bin/env bash
# The demo: installs the environment on first run, then fine-tunes a tiny CPM-2-architecture model on CPU (or GPU)
# on a project-written LCQMC-format dataset, in a few minutes on a 2-core laptop.
#   - data: tools/make_demo_data.py (pairs whose labels are learnable: paraphrase vs negation)
#   - vocab: tools/build_vocab.py over that data (the released CPM-2 vocab is not needed)
#   - training: scripts/full_model/finetune_cpm2_lcqmc.sh, the same script users run on the 11B model
# Results land in results/demo/: metrics.json, predictions.jsonl, dev/ and test/, tensorboard/, best/ (a checkpoint
# that --load takes back; the demo proves it by evaluating it again in results/demo/reload/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${ROOT}/scripts/env.sh" requirements.txt
cd "${ROOT}"
OUT="${DEMO_OUT:-${ROOT}/results/demo}"
rm -rf "${OUT}"
mkdir -p "${OUT}"

echo "[demo] 1/4 writing the demo dataset and building its vocab"
"${PYTHON}" tools/make_demo_data.py --out "${OUT}/data" --train 2000 --dev 200 --test 200
"${PYTHON}" tools/build_vocab.py --corpus "${OUT}/data/corpus.txt" --out "${OUT}/vocab/vocab.txt"

echo "[demo] 2/4 fine-tuning the tiny model (scripts/full_model/finetune_cpm2_lcqmc.sh)"
CONFIG_PATH="${ROOT}/configs/model/tiny_config.json" TOKENIZER_PATH="${OUT}/vocab" DATA_PATH="${OUT}/data" \
CKPT_PATH=none SAVE_PATH="${OUT}" MASTER_PORT="${MASTER_PORT:-29517}" FP16=0 \
EXTRA_ARGS="--epochs 1 --batch-size 16 --eval-batch-size 64 --lr 3e-3 --warmup 0.05 --eval-interval 40 --save-interval 125 --log-interval 20 --num-workers 0" \
  bash "${ROOT}/scripts/full_model/finetune_cpm2_lcqmc.sh"
cp "${OUT}/test/metrics.json" "${OUT}/metrics.json"
cp "${OUT}/test/predictions.jsonl" "${OUT}/predictions.jsonl"

echo "[demo] 3/4 reloading the best checkpoint with --load and evaluating it again"
"${PYTHON}" finetune_cpm2.py --model-config configs/model/tiny_config.json --tokenizer-path "${OUT}/vocab" \
  --data-path "${OUT}/data" --data-name lcqmc --load "${OUT}/best" --do-valid --do-eval --save "${OUT}/reload" \
  --eval-batch-size 64 --num-workers 0 > "${OUT}/reload.log" 2>&1 || { cat "${OUT}/reload.log"; exit 1; }

echo "[demo] 4/4 results"
"${PYTHON}" - "${OUT}" <<'PY'
import json, sys
out = sys.argv[1]
dev = json.load(open(f"{out}/dev/metrics.json"))
best = json.load(open(f"{out}/best/best.json"))
test = json.load(open(f"{out}/metrics.json"))
reload_dev = json.load(open(f"{out}/reload/dev/metrics.json"))
print(f"best dev accuracy {best['entries'][0]['value']:.3f} at step {best['entries'][0]['step']} (chance 0.5)")
print(f"test accuracy with the best weights: {test['accuracy']:.3f}")
print(f"the best checkpoint reloaded with --load: dev accuracy {reload_dev['accuracy']:.3f}")
if best["entries"][0]["value"] < 0.7:
    sys.exit("demo failed: dev accuracy below 0.7")
if reload_dev["accuracy"] != best["entries"][0]["value"]:
    sys.exit("demo failed: the reloaded best checkpoint does not reproduce its dev accuracy")
print(f"predictions: {out}/predictions.jsonl | metrics: {out}/metrics.json | TensorBoard: tensorboard --logdir {out}/tensorboard")
PY
