#!/usr/bin/env bash
# Session 11, run 2 (device tool, from the repo root): the model tests with attention_kernel='mosaic'
# that s11-1's time limit cut (generation, gradients), then the attention benchmark with rows
# printed as they are measured (s11-1's benchmark printed nothing inside its limit).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 170 python3 -m pytest -v -p no:cacheprovider -rfEs --durations=0 tests/test_model_mosaic.py \
  -k "generation or gradients" 2>&1 | tee "$OUT/pytest2.log" | grep -E "PASS|FAIL|ERROR|passed|failed|s call"
timeout 310 python3 benchmarks/bench_kernels.py --only attn --iters 10 --json "$OUT/bench.json" 2>&1 \
  | grep -v "^WARNING\|^I1203\|^W1203" | tee "$OUT/bench.txt"
