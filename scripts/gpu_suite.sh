#!/usr/bin/env bash
# Every GPU test and benchmark in one call; prints a short table last.
#   bash scripts/gpu_suite.sh [TEST_PATHS...]     (default: the whole tests/ directory)
# Env: BENCH="matmul,rows,attn,model" (what to benchmark; empty skips), BENCH_ARGS (extra flags),
#      DETJAX_SHARD=i/n (run every n-th test from the i-th: the suite in n calls; see tests/conftest.py).
# Writes logs under $OUT (device tool) or ./.gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
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
tests=("$@"); [ ${#tests[@]} -eq 0 ] && tests=(tests)
# -v: every test's result is logged as it ends, so a run cut by a time limit still names its failures
$PY -m pytest -v -p no:cacheprovider -rfEs "${tests[@]}" --junitxml "$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
BENCH=${BENCH-matmul,rows}
if [ -n "$BENCH" ]; then
  $PY benchmarks/bench_kernels.py --only "$BENCH" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
fi
echo; echo "== summary =="; tail -n 1 "$OUT/pytest.log"
[ -n "$BENCH" ] && sed -n '/^device:/,$p' "$OUT/bench.txt"
exit $test_rc
