#!/usr/bin/env bash
# Session 14, run 1 (device tool, from the repo root): GPU tests of the changed row kernels, matmul
# tile rule and Mosaic matmul dispatch; the output hashes (must equal s13-4's: every change is
# meant to be bit-neutral); then s14_1_bench.py (timings against the old code, same process).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_matmul_mgpu.py \
  "tests/test_reductions.py" "tests/test_matmul.py::test_gpu_configs_bitwise_identical" \
  -k "gpu or nan_inf or configs" 2>&1 | tail -8 | tee $OUT/s14_1_pytest.log
timeout 70 python3 scripts/output_hashes.py --json "$OUT/s14_1_hashes.json" 2>&1 | tail -n 20 | tee "$OUT/s14_1_hashes.txt"
timeout 320 python3 results/2026-12-04-h200/s14_1_bench.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tee $OUT/s14_1_bench.txt
