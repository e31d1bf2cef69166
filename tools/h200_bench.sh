#!/usr/bin/env bash
# One device call: the dense peers table (4 layers, checkpointing), longest sequence first,
# every variant in one process. Writes JSON under $OUT (rewritten after every row).
#   Needs .whl/liger_kernel-*.whl (pip download --no-deps liger-kernel -d .whl) carried along.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
timeout ${LIMIT:-540} python3 tools/bench.py --layers 4 --seqs ${SEQS:-65536 32768 16384} \
  --variants ${VARIANTS:-eager,compile,liger,tilepass-mlp,tilepass,tilepass+flex} \
  --out "$OUT/${NAME:-bench_dense_h200}.json" 2>&1 | grep -v -i warn | tail -25
