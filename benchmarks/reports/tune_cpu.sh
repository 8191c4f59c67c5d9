#!/usr/bin/env bash
# The committed tunes, in one command (from the project root, after `make demo`):
#
#   bash benchmarks/reports/tune_cpu.sh ["conditions to state in the reports"]
#
# 1. W18-small-v1 at 224x224, fp32 ONNX exported from a freshly initialised network (weights do
#    not change the speed; with no trained weights there is no val set to gate fp16/int8 on, so
#    precision is not searched), raw FP32 requests, p99 target 250 ms.
# 2. The bundled digits model of `make demo` (W18-small-v1 at 32x32, trained), raw FP32 requests,
#    p99 target 25 ms, fp16 and int8 versions gated on the digits val split.
# Each has a budget of 600 s and writes benchmarks/reports/tune_<name>/: tune.md, tune.json,
# tune_pareto.png and the chosen serving.yaml (plus its reduced model file if one won). The
# measurements are cached under runs/tune/: a second run of this script continues, not repeats.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
NOTE=${1:-}
WORK=runs/bench/w18_small_v1_224
MODEL=$WORK/w18_small_v1_224.onnx
DIGITS=runs/demo/repo/digits/1/model.onnx
VAL=runs/demo/data/val
[ -f "$DIGITS" ] || { echo "run make demo first: $DIGITS is missing" >&2; exit 2; }
mkdir -p "$WORK"

if [ ! -f "$MODEL" ]; then
    "$PYTHON" - "$WORK/fresh.ckpt" <<'PY'
import sys

import mindspore as ms

from core.metadata import ModelMetadata
from training.checkpoint import save_checkpoint
from training.model import create_model

ms.set_seed(0)
meta = ModelMetadata("w18_small_v1", 1000, 224)
save_checkpoint(create_model(meta.arch, meta.num_classes), sys.argv[1], meta)
PY
    "$PYTHON" -m hrnet export --ckpt "$WORK/fresh.ckpt" --format ONNX --out "$MODEL" --force
fi

OUT=benchmarks/reports/tune_w18_small_v1_224_cpu
mkdir -p "$OUT"
"$PYTHON" -m hrnet bench tune --model "$MODEL" --p99-ms 250 --budget-s 600 \
    --out "$OUT/serving.yaml" --report "$OUT" --note "$NOTE"

OUT=benchmarks/reports/tune_digits_cpu
mkdir -p "$OUT"
"$PYTHON" -m hrnet bench tune --model "$DIGITS" --p99-ms 25 --budget-s 600 --val "$VAL" \
    --out "$OUT/serving.yaml" --report "$OUT" --note "$NOTE"
