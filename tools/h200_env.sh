# Sourced by every tools/h200_*.sh: $OUT, unbuffered output, tilepass installed (editable; on
# the path if pip cannot), and Liger when its wheel was carried along in .whl/ (the GPU
# machine has no network: `pip download --no-deps liger-kernel -d .whl` here, carry ".whl").
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
