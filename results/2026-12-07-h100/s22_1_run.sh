#!/usr/bin/env bash
# Session 22, run 1, from the repo root: the INTERIOR_BLOCKS A/B (interior KV blocks folded without
# the per-row logit mask; default still "masked"): its GPU test (bf16, f16, compiled), then
# benchmarks/interior_mask.py (bits and times of masked / unmasked / column at the prefill
# and decode shapes) with the time left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s22_1_device.txt"
timeout 200 python3 -m pytest -v -p no:cacheprovider -rfEs -n 2 tests/test_attention.py \
  -k "interior_blocks" 2>&1 | grep --line-buffered -v "$F" > "$OUT/s22_1_pytest.log"
timeout $((570 - SECONDS)) python3 benchmarks/interior_mask.py 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s22_1_interior_mask.txt"
grep "PASSED\|FAILED\|ERROR\|Error" "$OUT/s22_1_pytest.log" | head -8; tail -2 "$OUT/s22_1_pytest.log"
cat "$OUT/s22_1_interior_mask.txt"
