#!/usr/bin/env bash
# Session 17, run 0 (device tool; asked for `nvidia-h200` after four failed H100 starts, and it ran on
# an NVIDIA H100 80GB HBM3), from the repo root. Its files were renamed after the run from *_h200.* to
# *_h100.* (s17_0_hashes_h100.json/.txt, s17_0_decode_sweep_h100.txt): the
# device; output hashes at HEAD (24 rows) compared with s16-1 (17 rows); the decode (warps, stages)
# sweep at long caches; the two tests changed after their last GPU run (the plain-XLA attention
# control checking all 16 rows, 4022657; the matmul accuracy measure, cecd843); a third of the GPU
# suite (DETJAX_SHARD=0/3).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
D=results/2026-12-07-h100
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s17_0_device.txt"
timeout 130 python3 scripts/output_hashes.py --json "$OUT/s17_0_hashes_h200.json" \
  --compare results/2026-12-04-h200/s16_1_hashes.json 2>&1 | grep -v "$F" | tee "$OUT/s17_0_hashes_h200.txt"
timeout 100 python3 $D/s17_decode_sweep.py 2>&1 | grep -v "$F" | tee "$OUT/s17_0_decode_sweep_h200.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs -n 4 \
  "tests/test_fusion.py::test_plain_xla_attention_control" "tests/test_matmul.py::test_accuracy_vs_float64" \
  2>&1 | grep -v "$F" | tail -6 | tee "$OUT/s17_0_pytest.log"
timeout 190 env DETJAX_SHARD=0/3 BENCH="" bash scripts/gpu_suite.sh -n 8 tests \
  --ignore=tests/test_tpu_interpret.py --ignore=tests/test_notebooks.py --ignore=tests/test_parallel.py \
  > /dev/null 2>&1
cp "$OUT/pytest.log" "$OUT/s17_0_suite_shard0of3.log"; rm -f "$OUT/pytest.log" "$OUT/env.txt" "$OUT/junit.xml"
grep "shared rows equal" "$OUT/s17_0_hashes_h200.txt"
echo "== suite shard 0/3 =="; grep -a "FAILED\|ERROR" "$OUT/s17_0_suite_shard0of3.log" | tail -8; tail -1 "$OUT/s17_0_suite_shard0of3.log"
