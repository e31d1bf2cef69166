#!/usr/bin/env bash
# One device call: the questions left after stop 10's follow-ups, in order of what they unblock.
#   1. Gemma 2 (softcap) training through flex against float64, padded (per-row reference)
#      and unpadded: is the routed error float32's?
#   2. the CUDA tests of attention routing (Gemma 2 with its softcap back in) and save_attention;
#   3. attention's own memory per kernel at 64K (why SDPA's route holds more than flex's);
#   4. the longest sequence of tilepass-mlp (16 layers; a parabola: it keeps the dense mask),
#      validated by one real run with what time is left.
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
for pad in --pad ""; do
  echo "# diag_grad_precision.py --arch gemma2 --impl eager $pad"
  timeout 90 python3 tools/diag_grad_precision.py --arch gemma2 --impl eager $pad 2>&1 | grep -v -i "warn" | tail -11
done | tee "$OUT/gemma2_softcap_grads_h200.txt"
timeout ${TESTS_S:-200} python3 -m pytest -q -p no:logging tests/test_attention.py tests/test_save_attention.py -k cuda \
  > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_cuda.log" | head -12
timeout 90 python3 tools/diag_attention_memory.py --seq 65536 --out "$OUT/attention_memory_h200.json" 2>&1 | grep -v -i warn | tail -7
LEFT=$(( ${LIMIT:-560} - SECONDS ))
[ "$LEFT" -gt 120 ] && timeout "$LEFT" python3 tools/max_seq.py --layers 16 --variants tilepass-mlp \
  --probe 16384 32768 65536 --cap 262144 --time-budget $(( LEFT - 20 )) \
  --out "$OUT/max_seq_dense_tilepass_mlp_h200.json" 2>&1 | grep -v -i warn | tail -3
