#!/usr/bin/env bash
# One device call: dense peers table, tokens-per-tile sweep, MoE stack. Writes JSON under $OUT.
#   Needs .whl/liger_kernel-*.whl (pip download --no-deps liger-kernel -d .whl) carried along.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
timeout 230 python3 tools/bench.py --layers 4 --seqs 16384 32768 65536 --variants eager,compile,liger,tilepass \
  --out "$OUT/bench_dense_h200.json" 2>&1 | tail -14
timeout 110 python3 tools/bench.py --layers 4 --seqs 65536 --variants tilepass@4096,tilepass@16384,tilepass@65536 \
  --out "$OUT/bench_tile_sweep_h200.json" 2>&1 | tail -5
timeout 230 python3 tools/bench.py --model moe --layers 4 --seqs 16384 32768 --variants eager,compile,tilepass \
  --out "$OUT/bench_moe_h200.json" 2>&1 | tail -8
