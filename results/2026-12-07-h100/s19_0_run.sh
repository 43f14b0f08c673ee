#!/usr/bin/env bash
# Session 19, run 0: NOT RUN (every machine start failed; its core ran as s19-1). Kept as the
# next GPU session's check (the benchmarks have changed since: see results/README.md, Session 19).
# (device tool), from the repo root: the device; output hashes at HEAD compared
# with s17-0 (H100), and again with prefill_call sending every head dim through the split-parallel
# kernels (PREFILL_SPLIT_PARALLEL_HEAD_DIMS) compared with the first;
# benchmarks/prefill_split_parallel.py (first run: prefill through the decode kernels, bits and
# time); benchmarks/decode_breakdown.py (first run: per-kernel decode breakdown and the
# DECODE_UNPADDED_ROWS A/B); the new split-parallel prefill test and the 27 GPU tests session 17
# did not finish (what time is left). The prefill A/B runs first (the device time was short).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
D=results/2026-12-07-h100   # (written as results/2026-12-07-s19/, moved here)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s19_0_device.txt"
timeout 220 python3 benchmarks/prefill_split_parallel.py 2>&1 | grep -v "$F" | tee "$OUT/s19_0_prefill_sp.txt"
timeout 110 python3 scripts/output_hashes.py --json "$OUT/s19_0_hashes.json" \
  --compare $D/s17_0_hashes_h100.json 2>&1 | grep -v "$F" | tee "$OUT/s19_0_hashes.txt"
# the same hashes with prefill_call sending every head dim through the split-parallel kernels
timeout 80 python3 -c "import sys; import pallas_kernels.attention as K
K.PREFILL_SPLIT_PARALLEL_HEAD_DIMS = frozenset({16, 32, 64, 128, 256})
sys.argv = ['output_hashes.py', '--compare', '$OUT/s19_0_hashes.json']
import runpy; runpy.run_path('scripts/output_hashes.py', run_name='__main__')" 2>&1 | grep -v "$F" \
  | tee "$OUT/s19_0_hashes_split_parallel.txt"
timeout 130 python3 benchmarks/decode_breakdown.py 2>&1 | grep -v "$F" | tee "$OUT/s19_0_breakdown.txt"
timeout $((585 - SECONDS)) python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 \
  tests/test_attention.py::test_prefill_split_parallel_gives_the_one_kernel_bits $(cat $D/s17_unfinished_tests.txt) \
  2>&1 | grep -v "$F" > "$OUT/s19_0_pytest.log"
grep "shared rows equal" "$OUT/s19_0_hashes.txt" "$OUT/s19_0_hashes_split_parallel.txt"
echo "== pytest =="; grep -a "FAILED\|ERROR" "$OUT/s19_0_pytest.log" | tail -8; tail -1 "$OUT/s19_0_pytest.log"
