#!/usr/bin/env bash
# One device call: the Qwen3-30B-A3B-shaped MoE stack, eager vs compile vs tilepass.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || export PYTHONPATH=$PWD
timeout 420 python3 tools/bench.py --model moe --layers 4 --seqs 32768 65536 --variants eager,compile,tilepass \
  --out "$OUT/bench_moe_h200.json" 2>&1 | grep -v '^{' | tail -9
python3 -c "import json; [print(r['variant'], r['seq'], r.get('tiled_regions'), r.get('rejected')) for r in json.load(open('$OUT/bench_moe_h200.json'))['rows']]"
