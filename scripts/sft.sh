#!/usr/bin/env bash
# Fine-tune Qwen2.5-VL the way the official tutorial's sft.sh does -- same variables at the top -- but as a
# thin wrapper over `vlsft train`: everything below becomes KEY=VALUE overrides of a run YAML, so
# `vlsft print-args` shows exactly what runs, the data is checked first, and checkpoints load anywhere.
#
#   bash scripts/sft.sh                    # edit the variables first
#   NPROC_PER_NODE=4 bash scripts/sft.sh   # fewer GPUs
#   DRY_RUN=1 bash scripts/sft.sh          # only print the launch plan (vlsft print-args)
#
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set (under SLURM,
# node rank and master address come from SLURM_* automatically).
set -euo pipefail
cd "$(dirname "$0")/.."

# ======================= the tutorial's variables ========================
llm=/models/Qwen2.5-VL-3B-Instruct          # local model folder (config.json decides Qwen2/2.5/3-VL)
dataset_dict=/data/Dataset-Dictionary.json  # {"name": {"data_path", "annotation_path", "length", ...}}
datasets=""                                 # e.g. "docs%50,charts%250"; empty = every dataset at its own rate
lr=2e-5                                     # the tutorial's advice; the official 2e-7 barely moves the loss
batch_size=4                                # per device
grad_accum_steps=4
epoch=1
run_name=qwen2vl-sft
output_dir=runs/${run_name}
export WANDB_PROJECT=${WANDB_PROJECT:-vlsft}   # WANDB_API_KEY only from your environment
# ========================================================================

config=${CONFIG:-configs/qwen2.5-vl-3b.yaml}
abs() { if [[ "$1" == *://* ]]; then echo "$1"; else realpath -m "$1"; fi; }  # YAML-relative otherwise
gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
overrides=(
  "model.name_or_path=$(abs "${llm}")"
  "data.dictionary=$(abs "${dataset_dict}")"
  "training.learning_rate=${lr}"
  "training.per_device_train_batch_size=${batch_size}"
  "training.gradient_accumulation_steps=${grad_accum_steps}"
  "training.num_train_epochs=${epoch}"
  "output.run_name=${run_name}"
  "output.dir=$(abs "${output_dir}")"
  "wandb.project=${WANDB_PROJECT}"
  "distributed.nproc_per_node=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
)
[[ -n "${datasets}" ]] && overrides+=("data.use=[${datasets}]")
[[ -n "${NNODES:-}" ]] && overrides+=("distributed.nnodes=${NNODES}")
[[ -n "${NODE_RANK:-}" ]] && overrides+=("distributed.node_rank=${NODE_RANK}")
[[ -n "${MASTER_ADDR:-}" ]] && overrides+=("distributed.master_addr=${MASTER_ADDR}")
[[ -n "${MASTER_PORT:-}" ]] && overrides+=("distributed.master_port=${MASTER_PORT}")

VLSFT=${VLSFT:-vlsft}
command -v "${VLSFT}" >/dev/null || VLSFT=.venv/bin/vlsft
if [[ -n "${DRY_RUN:-}" ]]; then
  exec "${VLSFT}" print-args --config "${config}" "${overrides[@]}"
fi
"${VLSFT}" datasets check "${dataset_dict}"
exec "${VLSFT}" train --config "${config}" "${overrides[@]}"
