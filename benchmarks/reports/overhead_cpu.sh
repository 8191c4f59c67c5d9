#!/usr/bin/env bash
# The committed overhead report, in one command (from the project root, after `make venv`):
#
#   bash benchmarks/reports/overhead_cpu.sh ["conditions to state in the report"]
#
# The server's own CPU per one-image request (FP32, UINT8, JPEG) on a near-free model, one
# process against --workers 2, each on uvloop and on asyncio's loop, alternated four times (the
# order reversed every other time); then the owner alone at 1, 2, 4 and 16 requests in flight on
# each loop. Writes benchmarks/reports/overhead_cpu/overhead.{md,json} and the plot. About 15
# minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m hrnet bench overhead --payloads fp32,uint8,jpeg --serve-workers 1,2 --event-loops uvloop,asyncio --repeats 4 \
    --duration 8 --owner-alone 1,2,4,16 --owner-requests 20000 \
    --report benchmarks/reports/overhead_cpu --note "${1:-}"
