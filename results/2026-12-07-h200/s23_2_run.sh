#!/usr/bin/env bash
# Session 23, run 2 (prepared, NOT YET RUN: no device time was left), from the repo root: diagnosis of
# s23_1's decode = prefill differences with the opt-in key splits (benchmarks.mosaic_splits.mosaic
# passes splits=True), then ptxas' register / spill report for the split and unsplit kernels.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s23_2_device.txt"
timeout $((190 - SECONDS)) python3 results/2026-12-07-h200/s23_2_diag.py 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s23_2_diag.txt"
cat "$OUT/s23_2_diag.txt"
MOSAIC_GPU_DUMP_PTXAS=1 timeout $((300 - SECONDS)) python3 results/2026-12-07-h200/s23_2_ptxas.py 2>&1 \
  | grep --line-buffered -i "===\|registers\|spill\|stack\|error" > "$OUT/s23_2_ptxas.txt"
cat "$OUT/s23_2_ptxas.txt"
