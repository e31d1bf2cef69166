#!/usr/bin/env bash
# One device call: does SDPA's cuDNN kernel close the gaps left at 64K (docs/benchmarks.md,
# Targets)? tools/diag_attention_memory.py measured cuDNN's backward at 1.3 GiB beyond its
# inputs against flash's 1.8 (one layer, 64K, GQA). Eager runs on cuDNN too, for a fair row.
#   1. dense 4-layer stack: eager and tilepass (defaults, save_attention) on flash and on cuDNN;
#   2. MoE 4-layer stack: eager and tilepass+save on cuDNN (their flash rows are on file);
#   3. the CUDA tests of attention routing and save_attention, with what time is left.
set -uo pipefail
source tools/h200_env.sh
timeout 330 python3 tools/bench.py --layers 4 --seqs 65536 \
  --variants eager,eager+cudnn,tilepass,tilepass+cudnn,tilepass+save+cudnn \
  --out "$OUT/bench_dense_cudnn_h200.json" 2>&1 | grep -v -i warn | tail -7
LEFT=$(( ${LIMIT:-570} - SECONDS ))
[ "$LEFT" -gt 100 ] && timeout "$(( LEFT - 60 ))" python3 tools/bench.py --model moe --layers 4 --seqs 65536 \
  --variants eager+cudnn,tilepass+save+cudnn \
  --out "$OUT/bench_moe_cudnn_h200.json" 2>&1 | grep -v -i warn | tail -4
LEFT=$(( ${LIMIT:-570} - SECONDS ))
[ "$LEFT" -gt 40 ] && timeout "$(( LEFT - 10 ))" python3 -m pytest -q -p no:logging tests/test_attention.py \
  tests/test_save_attention.py -k cuda > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_cuda.log" | head -12
