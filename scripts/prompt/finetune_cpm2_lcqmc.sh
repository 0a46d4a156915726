#!/usr/bin/env bash
# Prompt tuning of CPM-2 on lcqmc (only the 100 soft-prompt vectors train).
# Hyper-parameters are the original CPM-2-Finetune script's (lr 0.005, batch 32 per data-parallel rank, grad acc 1, 10 epochs, constant lr, no warm-up); every path and the topology can be set
# from the environment (see scripts/common.sh). Positional arguments as in the original: $1 LR, $2 GRAD_ACC, $3 POS (the prompt layout, e.g. 5_5_0), $4 SEED.
set -euo pipefail
WORKING_DIR="${WORKING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
source "${WORKING_DIR}/scripts/common.sh"

LR="${1:-${LR:-0.005}}"
GRAD_ACC="${2:-${GRAD_ACC:-1}}"
POS="${3:-${POS:-5_5_0}}"
SEED="${4:-${SEED:-1234}}"
BATCH_SIZE="${BATCH_SIZE:-32}"
DATA_PATH="${DATA_PATH:-${WORKING_DIR}/data/lcqmc}"
CKPT_PATH="${CKPT_PATH:-${WORKING_DIR}/checkpoints/cpm2}"
SAVE_PATH="${SAVE_PATH:-${WORKING_DIR}/results/lcqmc/cpm2_prompt_lr${LR}const_G${GRAD_ACC}_pos${POS:-default}_seed${SEED}}"
CONFIG_PATH="${CONFIG_PATH:-${WORKING_DIR}/configs/model/cpm2_config.json}"
DS_CONFIG="${DS_CONFIG:-${WORKING_DIR}/configs/deepspeed/ds_lcqmc_prompt.json}"
TOKENIZER_PATH="${TOKENIZER_PATH:-${WORKING_DIR}/bpe_cn}"
PROMPT_CONFIG="${PROMPT_CONFIG:-${WORKING_DIR}/configs/prompt/lcqmc/lcqmc_${POS}.json}"

OPTS=(
  --model-config "${CONFIG_PATH}" --tokenizer-path "${TOKENIZER_PATH}"
  --data-path "${DATA_PATH}" --data-ext .jsonl --data-name lcqmc
  --save "${SAVE_PATH}" --deepspeed --deepspeed_config "${DS_CONFIG}"
  --prompt-tune --prompt-config "${PROMPT_CONFIG}"
  --do-train --do-valid --do-eval
  --lr "${LR}" --lr-decay-style constant --warmup 0.0 --weight-decay 1e-2 --clip-grad 1.0
  --batch-size "${BATCH_SIZE}" --eval-batch-size "${EVAL_BATCH_SIZE:-32}" --gradient-accumulation-steps "${GRAD_ACC}"
  --epochs 10 --train-iters -1 --log-interval 10 --eval-interval 100 --save-interval 100000 --eval-iters 10
  --seed "${SEED}" --checkpoint-activations --deepspeed-activation-checkpointing 
)
cpm2_launch "${OPTS[@]}"
