#!/usr/bin/env bash
# Session 22, run 3, from the repo root: the split-parallel prefill (the default prefill at head dims
# 128/256, bf16/f16) under other (warps, stages) of its kernels than the decode-tuned gpu_config
# (benchmarks/prefill_split_parallel.py --configs: time and bits against the default config).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s22_3_device.txt"
timeout $((540 - SECONDS)) python3 benchmarks/prefill_split_parallel.py --configs 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s22_3_configs.txt"
cat "$OUT/s22_3_configs.txt"
