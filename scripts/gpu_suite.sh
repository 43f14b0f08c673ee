#!/usr/bin/env bash
# Every GPU test and benchmark in one call; prints a short table last.
#   bash scripts/gpu_suite.sh [PYTEST_ARGS...]    (default: every GPU-relevant test, 8 xdist workers)
# Env: BENCH="matmul,rows,attn" (what to benchmark; default matmul,rows; empty skips), BENCH_ARGS
#      (extra flags), GPU_WORKERS (xdist workers for the default test set; 0: one process),
#      DETJAX_SHARD=i/n (run every n-th test from the i-th: the suite in n calls; see tests/conftest.py),
#      DECODE_BANDWIDTH=1 (also benchmarks/decode_bandwidth.py: decode as % of copy),
#      DECODE_BREAKDOWN=1 (also benchmarks/decode_breakdown.py, with DECODE_BREAKDOWN_ARGS).
# Writes logs under $OUT (device tool) or ./.gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# several xdist workers share one GPU: none may take 75% of its memory up front
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
PY=${PYTHON:-python3}
$PY - <<'PY' | tee "$OUT/env.txt"
import datetime, jax, jaxlib, flax, numpy
try:
    import orbax.checkpoint as oc; ov = getattr(oc, "__version__", "?")
except Exception as e: ov = f"missing ({e})"
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "orbax", ov, "numpy", numpy.__version__)
print("devices", jax.devices(), jax.devices()[0].device_kind)
PY
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  # Default: every test that compiles for the GPU, on GPU_WORKERS xdist workers (8 by default; 0
  # runs them in one process). The TPU-interpret, notebook and 8-CPU-device files test nothing
  # GPU-specific (CI runs them). The tests alone take about 9-10 minutes on an H100 or H200
  # (session 16: cut at 99% by 560 s; session 17: three shards of 144 s and > 165 s), more than one
  # device call leaves with the benchmarks: run them as DETJAX_SHARD=0/3, 1/3, 2/3 with BENCH=""
  # and the benchmarks in a call of their own.
  tests=(tests --ignore=tests/test_tpu_interpret.py --ignore=tests/test_notebooks.py
         --ignore=tests/test_parallel.py)
  if [ "${GPU_WORKERS:-8}" != 0 ] && $PY -c 'import xdist' 2>/dev/null; then
    tests=(-n "${GPU_WORKERS:-8}" "${tests[@]}")
  fi
fi
# -v: every test's result is logged as it ends, so a run cut by a time limit still names its failures
$PY -m pytest -v -p no:cacheprovider -rfEs "${tests[@]}" --junitxml "$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
BENCH=${BENCH-matmul,rows}
if [ -n "$BENCH" ]; then
  $PY benchmarks/bench_kernels.py --only "$BENCH" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
fi
if [ -n "${DECODE_BANDWIDTH:-}" ]; then   # the attention issue's decode grid as % of copy
  $PY benchmarks/decode_bandwidth.py 2>&1 | tee "$OUT/decode_bandwidth.txt"
fi
if [ -n "${DECODE_BREAKDOWN:-}" ]; then   # per-kernel decode times and the unpadded-rows A/B
  $PY benchmarks/decode_breakdown.py ${DECODE_BREAKDOWN_ARGS:-} 2>&1 | tee "$OUT/decode_breakdown.txt"
fi
echo; echo "== summary =="; tail -n 1 "$OUT/pytest.log"
[ -n "$BENCH" ] && sed -n '/^device:/,$p' "$OUT/bench.txt"
[ -n "${DECODE_BANDWIDTH:-}" ] && tail -n 3 "$OUT/decode_bandwidth.txt"
exit $test_rc
