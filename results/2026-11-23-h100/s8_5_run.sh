#!/usr/bin/env bash
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 560 python .diag/sweep_f32.py > $OUT/s8_5_sweep_f32.txt 2>&1; grep -v "^WARNING" $OUT/s8_5_sweep_f32.txt
