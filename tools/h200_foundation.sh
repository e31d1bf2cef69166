#!/usr/bin/env bash
# One device call: the CPU+CUDA test suite on the device's torch, then the dense benchmark.
#   bash tools/h200_foundation.sh   (writes under $OUT when set)
set -uo pipefail
source tools/h200_env.sh  # $OUT, tilepass (and Liger, if carried) installed
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout 240 python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.txt"
timeout 420 python3 tools/bench.py --layers 4 --seqs 16384 32768 65536 --ckpt on --out "$OUT/bench_dense_h200.json" 2>&1 | tee "$OUT/bench.log" | tail -14
