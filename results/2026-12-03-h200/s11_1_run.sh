#!/usr/bin/env bash
# Session 11, run 1 (device tool, from the repo root): the Mosaic attention GPU tests (kernel v2:
# 'tokens' layout, boundary-only masks, 128-key blocks at head dim <= 128, lse + Triton backward)
# and the model with attention_kernel='mosaic'; the attention benchmark (issue shapes); hashes.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
BENCH= timeout 300 bash scripts/gpu_suite.sh tests/test_mosaic_attention.py tests/test_model_mosaic.py
rc=$?
timeout 200 python3 benchmarks/bench_kernels.py --only attn --iters 10 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -n 45
timeout 60 python3 scripts/output_hashes.py --json "$OUT/hashes.json" 2>&1 | tail -n 20 | tee "$OUT/hashes.txt"
exit $rc
