#!/usr/bin/env bash
# One device call: the open GPU questions of stop 10, in order of what they unblock.
#   1. save_attention on flex: which step faults, keeping or recomputing? (tools/diag_save_flex.py)
#   2. Gemma 2's softcap in training: precision or a bug? (float64 reference, unpadded batch)
#   3. the CUDA tests of attention routing and save_attention;
#   4. save_attention against its control (the policy keeping nothing: torch < 2.13 moves the
#      layer to the selective-checkpoint path), dense, 64K;
#   5. the longest sequence of tilepass-mlp (16 layers; a parabola: it keeps the dense mask),
#      with what time is left.
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
timeout 200 python3 tools/diag_save_flex.py 2>&1 | grep -E "VERDICT|^    " | head -20
timeout 80 python3 tools/diag_grad_precision.py --arch gemma2 --impl eager --force-softcap 2>&1 | grep -v -i "warn" | tail -11
timeout ${TESTS_S:-170} python3 -m pytest -q -p no:logging tests/test_attention.py tests/test_save_attention.py -k cuda \
  > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_cuda.log" | head -12
timeout 200 python3 tools/bench.py --layers 4 --seqs 65536 --variants tilepass,tilepass+save,tilepass+save-nothing \
  --out "$OUT/bench_dense_save_control_h200.json" 2>&1 | grep -v -i warn | tail -4
LEFT=$(( ${LIMIT:-560} - SECONDS ))
[ "$LEFT" -gt 120 ] && timeout "$LEFT" python3 tools/max_seq.py --layers 16 --variants tilepass-mlp \
  --probe 16384 32768 65536 --cap 262144 --time-budget $(( LEFT - 20 )) \
  --out "$OUT/max_seq_dense_tilepass_mlp_h200.json" 2>&1 | grep -v -i warn | tail -3
