#!/usr/bin/env bash
# Shared launcher logic for scripts/full_model/*.sh and scripts/prompt/*.sh (sourced, not run).
#
# Environment (all optional):
#   WORKING_DIR           repo root (default: the folder holding scripts/)
#   DATA_PATH CKPT_PATH SAVE_PATH LOG_FILE CONFIG_PATH TOKENIZER_PATH DS_CONFIG PROMPT_CONFIG
#                         as in the original scripts; CKPT_PATH=none trains from random weights (--random-init)
#   MP_SIZE               model-parallel size (default: 4 with >= 4 GPUs, else the GPU count; 1 on CPU)
#   NUM_WORKERS           nodes (default 1); with > 1 the hostfile HOST_FILE is used
#   NUM_GPUS_PER_WORKER   processes per node (default: all GPUs; on CPU: MP_SIZE)
#   HOST_FILE             DeepSpeed hostfile, "node0 slots=8" per line (default configs/host_files/hostfile-cpm2)
#   MASTER_PORT           rendezvous port (default 29500)
#   LAUNCHER_ARGS         extra deepspeed-launcher flags (e.g. "--no_ssh --node_rank 1 --master_addr host0")
#   NODE_RANK             only names this node's log file (train_log.node<N>) when launching per node (--no_ssh)
#   EXTRA_ARGS            extra finetune_cpm2.py flags, appended last (they win), e.g. "--train-iters 10"
#   PYTHON                interpreter (default: .venv/bin/python when present, else python3)
# Without a GPU the run uses gloo and fp32 (DeepSpeed refuses fp16 on CPU) and says so first.

WORKING_DIR="${WORKING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "${WORKING_DIR}/.venv/bin/python" ]; then PYTHON="${WORKING_DIR}/.venv/bin/python"; else PYTHON=python3; fi
fi

cpm2_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# cpm2_launch ARG... : runs finetune_cpm2.py with ARGs (+ --fp16 on GPU when FP16=1) through the deepspeed launcher.
cpm2_launch() {
  local gpus ckpt_opts=() precision_opts=() host_opts=()
  gpus="$(cpm2_gpu_count)"
  NUM_WORKERS="${NUM_WORKERS:-1}"
  if [ "${gpus}" -gt 0 ]; then
    if [ -z "${MP_SIZE:-}" ]; then if [ "${gpus}" -ge 4 ]; then MP_SIZE=4; else MP_SIZE="${gpus}"; fi; fi
    NUM_GPUS_PER_WORKER="${NUM_GPUS_PER_WORKER:-${gpus}}"
    [ "${FP16:-1}" = "1" ] && precision_opts=(--fp16)
    echo "[cpm2] GPU mode: ${NUM_WORKERS} node(s) x ${NUM_GPUS_PER_WORKER} GPU(s), MP ${MP_SIZE}, ${precision_opts[*]:-fp32}"
  else
    MP_SIZE="${MP_SIZE:-1}"
    NUM_GPUS_PER_WORKER="${NUM_GPUS_PER_WORKER:-${MP_SIZE}}"
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS_PER_WORKER > 0 ? $(nproc) / NUM_GPUS_PER_WORKER : 1 ))}"
    echo "[cpm2] CPU mode: no GPU found; fp32 with gloo, ${NUM_WORKERS} node(s) x ${NUM_GPUS_PER_WORKER} process(es), MP ${MP_SIZE}"
  fi
  if [ "${CKPT_PATH:-none}" = "none" ]; then ckpt_opts=(--random-init); else ckpt_opts=(--load "${CKPT_PATH}"); fi
  if [ "${NUM_WORKERS}" -gt 1 ]; then
    HOST_FILE="${HOST_FILE:-${WORKING_DIR}/configs/host_files/hostfile-cpm2}"
    host_opts=(--hostfile "${HOST_FILE}")
  elif [ -n "${HOST_FILE:-}" ]; then
    host_opts=(--hostfile "${HOST_FILE}")
  fi
  mkdir -p "${SAVE_PATH}"
  local cmd=("${PYTHON}" -m deepspeed.launcher.runner --num_nodes "${NUM_WORKERS}" --num_gpus "${NUM_GPUS_PER_WORKER}"
             --master_port "${MASTER_PORT:-29500}" "${host_opts[@]}" ${LAUNCHER_ARGS:-}
             "${WORKING_DIR}/finetune_cpm2.py" "$@" --model-parallel-size "${MP_SIZE}" "${ckpt_opts[@]}"
             "${precision_opts[@]}" --log-file "${LOG_FILE:-${SAVE_PATH}/log.txt}" ${EXTRA_ARGS:-})
  echo "${cmd[@]}"
  # One log per node when several launchers share SAVE_PATH (multi-node on a shared filesystem).
  "${cmd[@]}" 2>&1 | tee "${SAVE_PATH}/train_log${NODE_RANK:+.node${NODE_RANK}}"
  return "${PIPESTATUS[0]}"
}
