#!/usr/bin/env bash
# One GPU check in one go, for a short lease on a CUDA machine that has torch, transformers
# and triton but not this package (no registry there, no real weights: tiny presets only).
#
#   OUT=results bash examples/gpu_check.sh      # from the repository root
#
# Stages, each under its own time limit, in order of importance; a failing stage does not
# stop the next one:
#   1. the `-m gpu` kernel tests (Triton tree attention at realistic sizes, fp32 exactness of
#      the kernel, FlexAttention forward+backward against fp32);
#   2. examples/bench_kernels.py --quick (Triton vs reference vs SDPA vs FlexAttention);
#   3. `aurora demo` on tiny-llama on CUDA (serving + the trainer on its own CUDA stream +
#      hot swaps; a random tiny model accepts ~nothing, so its speedups mean nothing);
#   4. the tiny-model greedy exactness tests with engines on CUDA (device "auto" picks it);
#   5. CUDA-graph greedy exactness (`tests/test_compile.py -m gpu`), slow to compile.
# Whole script: ~11 minutes at most, ~6 typical on an H200.
# Writes $OUT/summary.txt (machine, versions, one line per stage) and one log per stage.
set -u
OUT=${OUT:-gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| triton', triton.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} > "$SUMMARY"

# The package without its dependencies, as a plain (non-editable) install beside the image's
# site-packages: `aurora.kernels` lives in kernels/ and only an install maps it. `-P` keeps
# the checkout's own aurora/ (which lacks that mapping) off sys.path.
SITE=/tmp/aurora_site
$PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . > "$OUT/install.log" 2>&1 \
  || { echo "install FAILED (see install.log)" >> "$SUMMARY"; cat "$SUMMARY"; exit 1; }
export PYTHONPATH="$SITE"
$PY -P -c "import aurora.kernels, aurora; print('aurora from', aurora.__file__)" >> "$SUMMARY" 2>&1

stage() {  # stage NAME LIMIT_S COMMAND...: run under a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local last
  last=$(grep -E "passed|failed|error|speedup over plain|Error" "$OUT/$name.log" | tail -n 1)
  echo "$name: rc $rc in $((SECONDS - t0)) s (limit $limit s) ${last}" | tee -a "$SUMMARY"
}

stage gpu_kernels 90 $PY -P -m pytest -q -p no:cacheprovider --timeout=60 -rf tests/test_kernels.py -m gpu
stage bench_kernels 130 $PY -P examples/bench_kernels.py --quick --out "$OUT/bench_kernels.json"
stage demo 80 $PY -P -m aurora demo --model tiny-llama --device "${DEVICE:-cuda}" --dtype float32 \
  --domains stdlib --requests 16 --max-tokens 32 --baseline 2 --out /tmp/aurora_demo
stage exactness 150 $PY -P -m pytest -q -p no:cacheprovider --timeout=60 -rf \
  tests/test_exactness.py tests/test_suffix_exactness.py -m "not slow" -k greedy
# last: inductor's first CUDA-graph compile took > 95 s on tiny-llama (session 9); the per-test
# timeout sits inside the stage's limit so that pytest-timeout prints where it was
stage cuda_graphs 200 $PY -P -m pytest -q -p no:cacheprovider --timeout=180 -rf \
  tests/test_compile.py -m gpu -k tiny-llama
cat "$SUMMARY"
