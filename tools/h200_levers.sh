#!/usr/bin/env bash
# One device call: what the step time is made of, and the save_attention lever.
#   1. the CUDA tests of save_attention and of eager-form attention with padding;
#   2. the dense 4-layer stack at 64K: eager, tilepass defaults, and with save_attention;
#   3. a profiled step of the MoE stack (1 layer, 64K): eager vs tilepass, top kernels.
# Each stage has its own time limit, so one slow stage cannot take the others' time.
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
timeout ${TESTS_S:-150} python3 -m pytest -q -rs -p no:logging tests/test_save_attention.py tests/test_attention.py \
  -k "cuda and (save or gemma2)" > "$OUT/pytest_levers.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_levers.log" | head -20
timeout ${BENCH_S:-250} python3 tools/bench.py --layers 4 --seqs ${SEQS:-65536} \
  --variants ${VARIANTS:-eager,tilepass,tilepass+save,tilepass+flex+save} \
  --out "$OUT/${NAME:-bench_dense_save_h200}.json" 2>&1 | grep -v -i warn | tail -8
timeout ${PROFILE_S:-150} python3 tools/profile_step.py --model moe --layers 1 --seq 65536 --variants eager,tilepass \
  --top 30 --out "$OUT/profile" 2>&1 | grep -v -i "warn\|USDT" | tail -75
