#!/usr/bin/env bash
# One device call: the dense peers table (4 layers, checkpointing), longest sequence first,
# every variant in one process. Writes JSON under $OUT (rewritten after every row).
#   Needs .whl/liger_kernel-*.whl (pip download --no-deps liger-kernel -d .whl) carried along.
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
timeout ${LIMIT:-540} python3 tools/bench.py --layers 4 --seqs ${SEQS:-65536 32768 16384} \
  --variants ${VARIANTS:-eager,compile,liger,tilepass-mlp,tilepass,tilepass+flex} \
  --out "$OUT/${NAME:-bench_dense_h200}.json" 2>&1 | grep -v -i warn | tail -25
