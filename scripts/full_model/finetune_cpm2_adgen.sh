#!/usr/bin/env bash
# Full-model fine-tuning of CPM-2 on adgen.
# Hyper-parameters are the original CPM-2-Finetune script's (lr 3e-6, batch 16 per data-parallel rank, grad acc 2, 10 epochs, constant lr, no warm-up); every path and the topology can be set
# from the environment (see scripts/common.sh). Positional arguments as in the original: $1 LR, $2 GRAD_ACC, $3 SEED.
set -euo pipefail
WORKING_DIR="${WORKING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
source "${WORKING_DIR}/scripts/common.sh"

LR="${1:-${LR:-3e-6}}"
GRAD_ACC="${2:-${GRAD_ACC:-2}}"
SEED="${3:-${SEED:-1234}}"
BATCH_SIZE="${BATCH_SIZE:-16}"
DATA_PATH="${DATA_PATH:-${WORKING_DIR}/data/adgen}"
CKPT_PATH="${CKPT_PATH:-${WORKING_DIR}/checkpoints/cpm2}"
SAVE_PATH="${SAVE_PATH:-${WORKING_DIR}/results/adgen/cpm2_finetune_lr${LR}const_G${GRAD_ACC}_seed${SEED}}"
CONFIG_PATH="${CONFIG_PATH:-${WORKING_DIR}/configs/model/cpm2_config.json}"
DS_CONFIG="${DS_CONFIG:-${WORKING_DIR}/configs/deepspeed/ds_full_model.json}"
TOKENIZER_PATH="${TOKENIZER_PATH:-${WORKING_DIR}/bpe_cn}"

OPTS=(
  --model-config "${CONFIG_PATH}" --tokenizer-path "${TOKENIZER_PATH}"
  --data-path "${DATA_PATH}" --data-ext .json --data-name adgen
  --save "${SAVE_PATH}" --deepspeed --deepspeed_config "${DS_CONFIG}"
  --do-train --do-valid --do-eval
  --lr "${LR}" --lr-decay-style constant --warmup 0.0 --weight-decay 1e-2 --clip-grad 1.0
  --batch-size "${BATCH_SIZE}" --eval-batch-size "${EVAL_BATCH_SIZE:-64}" --gradient-accumulation-steps "${GRAD_ACC}"
  --epochs 10 --train-iters -1 --log-interval 10 --eval-interval 100 --save-interval 100000 --eval-iters 10
  --seed "${SEED}" --checkpoint-activations --deepspeed-activation-checkpointing --top-p 0.9 --top-k 40 --temperature 1.0
)
cpm2_launch "${OPTS[@]}"
