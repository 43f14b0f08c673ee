#!/usr/bin/env bash
# Session 24, run 2, from the repo root: the split order's merges by explicitly rounded PTX
# (attention_mgpu._rn: mul.rn.f32 / add.rn.f32, never an FMA). 1. the Mosaic split-order GPU
# tests (decode = prefill at 12 positions, head dims 64/128/256, bf16/f16; accuracy); 2. the merge
# total A/B (global scratch by 64 or 32 columns, or registers) with ptxas' spill report (s24_2_chunk.py); 3. benchmarks/mosaic_splits.py --quick.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s24_2_device.txt"
timeout $((160 - SECONDS)) python3 -m pytest -v -p no:cacheprovider -rfEs tests/test_mosaic_attention.py \
  -k "split_order" 2>&1 | grep --line-buffered -v "$F" > "$OUT/s24_2_pytest.log"
grep "PASSED\|FAILED\|ERROR\|passed\|failed" "$OUT/s24_2_pytest.log" | tail -12
MOSAIC_GPU_DUMP_PTXAS=1 timeout $((400 - SECONDS)) python3 results/2026-12-07-h100-s24/s24_2_chunk.py 2>&1 \
  | grep --line-buffered "===\|RESULT\|spill stores\|Error\|error" > "$OUT/s24_2_chunk.txt"
cat "$OUT/s24_2_chunk.txt"
timeout $((${END:-585} - SECONDS)) python3 benchmarks/mosaic_splits.py --quick 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s24_2_bench.txt"
cat "$OUT/s24_2_bench.txt"
