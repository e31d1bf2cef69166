#!/usr/bin/env bash
# One device call: the CUDA attention tests, a probe of flex features on this torch, and
# the 4-layer dense bench (every variant, one process). Writes logs and JSON under $OUT.
#   Needs .whl/liger_kernel-*.whl carried along (see tools/h200_bench.sh).
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -rs tests/test_attention.py -k "cuda ${TESTS_K:-}" -p no:logging > "$OUT/pytest_attention.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_attention.log" | head -30
timeout 60 python3 tools/flex_probe.py > "$OUT/flex_probe.log" 2>&1; tail -4 "$OUT/flex_probe.log"
timeout ${BENCH_S:-330} python3 tools/bench.py --layers 4 --seqs ${SEQS:-16384 32768 65536} \
  --variants ${VARIANTS:-eager,compile,liger,tilepass,tilepass+flex} --out "$OUT/bench_dense_h200.json" > "$OUT/bench.log" 2>&1
grep -o '"variant": "tilepass+flex".*' "$OUT/bench.log" | cut -c1-400 | tail -3; tail -16 "$OUT/bench.log"
