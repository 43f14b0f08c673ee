#!/usr/bin/env bash
# Session 20, run 1 (device tool), from the repo root: output hashes against s19-1 (the row groups
# of the split-parallel prefill and its two new rows on the GPU), then the A/B of the block step's
# selects (benchmarks/block_step_selects.py: bits and times of prefill and decode) and its GPU test.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s20_1_device.txt"
git log -1 --format=%h 2>/dev/null | tee -a "$OUT/s20_1_device.txt"
timeout 170 python3 scripts/output_hashes.py --json "$OUT/s20_1_hashes.json" \
  --compare results/2026-12-07-h100/s19_1_hashes.json 2>&1 | grep -v "$F" | tee "$OUT/s20_1_hashes.txt" | tail -4
timeout 270 python3 benchmarks/block_step_selects.py 2>&1 | grep -v "$F" | tee "$OUT/s20_1_selects.txt"
timeout $((560 - SECONDS)) python3 -m pytest -v -p no:cacheprovider -rfEs -n 3 \
  tests/test_attention.py::test_block_step_selects_do_not_change_bits 2>&1 | grep -v "$F" \
  | tee "$OUT/s20_1_pytest.log" | tail -5
echo "== selects =="; cat "$OUT/s20_1_selects.txt" | tail -20
