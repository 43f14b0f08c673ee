#!/usr/bin/env bash
# s10-2: 128-row prefill q tiles (bits + time); decode states for real rows only (before/after)
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
D=results/2026-12-02-h200
python -c "import jax; from benchmarks.bench_kernels import copy_bandwidth_gbs as c; print('copy GB/s', round(c(10)))" 2>&1 | grep -v "^WARNING"
timeout 200 python $D/s10_2_decode_before_after.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_2_decode.txt
timeout 330 python $D/s10_2_qtile.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_2_qtile.txt
