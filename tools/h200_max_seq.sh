#!/usr/bin/env bash
# One device call: the longest sequence that fits on one H200 for the 16-layer dense stack
# (eager, Liger's tiled MLP, tilepass with its default options), layer checkpointing.
#   Needs .whl/liger_kernel-*.whl carried along (see tools/h200_bench.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
timeout ${LIMIT:-560} python3 tools/max_seq.py --layers 16 --variants ${VARIANTS:-eager,liger,tilepass+flex} \
  --probe ${PROBES:-16384 32768 65536} --cap ${CAP:-393216} --out "$OUT/max_seq_h200.json" 2>&1 | grep -v Warning | tail -8
