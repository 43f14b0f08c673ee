#!/usr/bin/env bash
# s10-6: the Mosaic GPU probe with detjax's row intervals (results/2026-12-02-h200/s10_6_mgpu_intervals.py)
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python results/2026-12-02-h200/s10_6_mgpu_intervals.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_6_mgpu_intervals.txt | tail -40
