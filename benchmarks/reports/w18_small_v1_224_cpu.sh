#!/usr/bin/env bash
# The committed CPU report, in one command (from the project root, after `make venv`):
#
#   bash benchmarks/reports/w18_small_v1_224_cpu.sh ["conditions to state in the report"]
#
# W18-small-v1 at 224x224, fp32 ONNX, 1000 classes, exported by `hrnet export` from a freshly
# initialised network (weights do not change the speed). Writes into
# benchmarks/reports/w18_small_v1_224_cpu/:
#   peers.md/.json/*.png     the ceiling, our sweep over 1..32 callers and MLServer's, in one run
#                            then 4 alternated pairs of the ceiling and our server at saturation
#   batching.md/.json/*.png  dynamic batching off vs on at 16 callers, alternated 3 times
# Needs about 14 minutes on an idle 2-core machine, and MLServer's virtual environment, which
# the first run installs under runs/peers/ (a few minutes more).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
NOTE=${1:-}
WORK=runs/bench/w18_small_v1_224
OUT=benchmarks/reports/w18_small_v1_224_cpu
MODEL=$WORK/w18_small_v1_224.onnx
mkdir -p "$WORK" "$OUT"

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

"$PYTHON" -m hrnet bench peers --model "$MODEL" --concurrency 1,2,4,8,16,32 --warmup 3 --duration 20 --paired 4 \
    --report "$OUT" --note "$NOTE"
"$PYTHON" -m hrnet bench batching --model "$MODEL" --concurrency 16 --repeats 3 --warmup 3 --duration 20 \
    --report "$OUT" --note "$NOTE"
