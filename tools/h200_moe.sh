#!/usr/bin/env bash
# One device call: the Qwen3-30B-A3B-shaped MoE stack at 64K tokens: eager, tilepass (defaults),
# tilepass+save (save_attention), and a tokens-per-tile sweep of the defaults (8192 tokens per
# tile is the default's 8 tiles). Writes JSON under $OUT after every row.
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
timeout ${LIMIT:-540} python3 tools/bench.py --model moe --layers 4 --seqs ${SEQS:-65536} \
  --variants ${VARIANTS:-eager,tilepass,tilepass+save,tilepass@16384,tilepass@32768} \
  --out "$OUT/${NAME:-bench_moe_h200}.json" 2>&1 | grep -v -i warn | tail -12
