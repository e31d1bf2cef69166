#!/usr/bin/env bash
# One device call: the CUDA attention tests, then the longest sequence that fits on one H200
# for the 16-layer dense stack (layer checkpointing), per variant: probes, a line through the
# two longest runs, real steps up to --cap within the time budget (see tools/max_seq.py).
#   Needs .whl/liger_kernel-*.whl carried along for the liger variant (see tools/h200_bench.sh).
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
timeout 90 python3 tools/diag_mask_program.py 2>&1 | grep -v -i warn | head -${DIAG_LINES:-12}
if [ "${TESTS_S:-0}" -gt 0 ]; then
  timeout "$TESTS_S" python3 -m pytest -q -rs tests/test_attention.py -k "cuda ${TESTS_K:-}" -p no:logging > "$OUT/pytest_attention.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_attention.log" | head -20
fi
LIMIT=${LIMIT:-540}  # seconds for this whole script
timeout $(( LIMIT + 30 - SECONDS )) python3 tools/max_seq.py --layers 16 --variants ${VARIANTS:-eager,liger,tilepass} \
  --probe ${PROBES:-32768 65536} --cap ${CAP:-393216} --time-budget $(( LIMIT - SECONDS )) --out "$OUT/${NAME:-max_seq_h200}.json" \
  2>&1 | grep -v -i warn | tail -8
