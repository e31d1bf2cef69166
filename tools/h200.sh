#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, on one H200 in one device call (the machine has no
# network; a call has 10 minutes). Writes logs and JSON under $OUT (rewritten after every row).
#
#   bash tools/h200.sh RUN [RUN ...]      e.g.  bash tools/h200.sh tests dense
#
#   tests        the CUDA tests (attention routing, save_attention)
#   suite        the whole test suite on the device's torch
#   dense        dense 4-layer table at 64K/32K/16K: eager, compile, liger, tilepass-mlp, tilepass, tilepass+flex
#   save         dense at 64K: save_attention and its control (the policy keeping nothing)
#   cudnn        dense and MoE at 64K with SDPA restricted to cuDNN's kernel
#   moe          MoE 4-layer stack at 64K: eager, defaults, save_attention, tokens per tile
#   max_seq      the longest sequence of the 16-layer dense stack, per variant
#   memory_peak  what is alive at the peak of one step (dense, 4 layers, 64K)
#   causal       causal LM (loss from labels) at 64K: tilepass+skip, liger (FLCE), cce, +save+skip, defaults, eager
#   causal_max_seq  the longest sequence of the 16-layer causal LM: tilepass+skip, liger, eager
#   lora         dense stack with PEFT LoRA (r 16, all linear, base frozen) at 64K: tilepass, tilepass+save, eager
#   causal_lora  causal LM with PEFT LoRA (r 16, all linear, base and LM head frozen) at 64K: eager, liger, tilepass+skip, +save2
#   moe_lora     MoE stack with PEFT LoRA (r 16 on the attention projections, base frozen) at 64K: eager, tilepass, +save
#
# Overrides: SEQS and VARIANTS (for a bench or max_seq run), MODEL (memory_peak: dense, causal or moe), NAME (its JSON file's name),
# LIMIT (seconds per run, default 540; every run also stops 15 s before TOTAL=580 s in all).
# Liger and Cut Cross-Entropy (the liger and cce variants): `pip download --no-deps liger-kernel==0.8.5
# cut-cross-entropy -d .whl` here, carry ".whl".
set -uo pipefail
RUNS=" tests suite dense save cudnn moe max_seq memory_peak causal causal_max_seq lora causal_lora moe_lora "
[ $# -gt 0 ] || { sed -n '5,19p' "$0"; exit 2; }
for r in "$@"; do
  [[ "$RUNS" == *" $r "* ]] || { echo "unknown run '$r' (valid:$RUNS)"; exit 2; }
done
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

# run NAME LIMIT CMD...: CMD under the smaller of LIMIT and what is left of TOTAL, warnings dropped
capped() { local left=$(( ${TOTAL:-580} - 15 - SECONDS )); echo $(( $1 < left ? $1 : left )); }
run() {
  local name=$1 limit; limit=$(capped "$2"); shift 2
  if [ "$limit" -lt 30 ]; then echo "## $name: skipped, ${limit}s left"; return; fi
  echo "## $name (${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "## $name rc=$?"
  grep -v -i "warn" "$OUT/$name.log" | tail -"${TAIL:-16}"
}
bench() { local name=$1; shift; run "$name" "${LIMIT:-540}" python3 tools/bench.py "$@" --out "$OUT/${NAME:-$name}.json"; }

for r in "$@"; do
  case $r in
    tests) run tests "${LIMIT:-200}" python3 -m pytest -q -rs -p no:logging tests/test_attention.py tests/test_save_attention.py -k cuda ;;
    suite) run suite "${LIMIT:-540}" python3 -m pytest -q -rs -p no:cacheprovider tests ;;
    dense) bench bench_dense_h200 --layers 4 --seqs ${SEQS:-65536 32768 16384} \
             --variants "${VARIANTS:-eager,compile,liger,tilepass-mlp,tilepass,tilepass+flex}" ;;
    save) bench bench_dense_save_h200 --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager,tilepass,tilepass+save,tilepass+save-nothing}" ;;
    cudnn) LIMIT=${LIMIT:-300} bench bench_dense_cudnn_h200 --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager,eager+cudnn,tilepass,tilepass+cudnn,tilepass+save+cudnn}"
           LIMIT=${LIMIT:-240} bench bench_moe_cudnn_h200 --model moe --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager+cudnn,tilepass+save+cudnn}" ;;
    moe) bench bench_moe_defaults_h200 --model moe --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager,tilepass,tilepass+save,tilepass@16384,tilepass@32768}" ;;
    max_seq) run max_seq "${LIMIT:-540}" python3 tools/max_seq.py --layers 16 --variants "${VARIANTS:-eager,liger,tilepass}" \
             --probe ${SEQS:-32768 65536} --cap 393216 --time-budget $(( $(capped "${LIMIT:-540}") - 30 )) \
             --out "$OUT/${NAME:-max_seq_h200}.json" ;;
    memory_peak) run memory_peak "${LIMIT:-300}" python3 tools/memory_peak.py --model ${MODEL:-dense} --layers 4 --seq ${SEQS:-65536} \
             --variants "${VARIANTS:-tilepass,tilepass+flex,eager}" --top 14 --out "$OUT/${NAME:-memory_peak_dense_h200}.json" ;;
    causal) bench bench_causal_h200 --model causal --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-tilepass+skip,liger,cce,tilepass+save+skip,tilepass,eager}" ;;
    causal_max_seq) run causal_max_seq "${LIMIT:-540}" python3 tools/max_seq.py --model causal --layers 16 \
             --variants "${VARIANTS:-tilepass+skip,liger,eager}" --probe ${SEQS:-32768 65536} --cap 393216 \
             --time-budget $(( $(capped "${LIMIT:-540}") - 30 )) --out "$OUT/${NAME:-max_seq_causal_h200}.json" ;;
    lora) bench bench_lora_h200 --lora --layers 4 --seqs ${SEQS:-65536} --variants "${VARIANTS:-tilepass,tilepass+save,eager}" ;;
    causal_lora) bench bench_causal_lora_h200 --model causal --lora --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager,liger,tilepass+skip,tilepass+save2+skip,tilepass+save+skip}" ;;
    moe_lora) bench bench_moe_lora_h200 --model moe --lora --layers 4 --seqs ${SEQS:-65536} \
             --variants "${VARIANTS:-eager,tilepass,tilepass+save}" ;;
  esac
done
