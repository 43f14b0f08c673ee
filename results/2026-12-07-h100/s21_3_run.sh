#!/usr/bin/env bash
# Session 21, run 3, from the repo root: DECODE_UNPADDED_ROWS on by default (s21-1: same bits, 1.07-1.36x).
# Output hashes against s20-2 (no bit may move), the decode grid as % of copy
# (benchmarks/decode_bandwidth.py), then the A/B of DECODE_MERGE_UNROLL 1/4/8
# (benchmarks/decode_breakdown.py --merge-only: time and bits) with the time left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s21_3_device.txt"
timeout 200 python3 scripts/output_hashes.py --json "$OUT/s21_3_hashes.json" \
  --compare results/2026-12-07-h100/s20_2_hashes.json 2>&1 | grep -v "$F" > "$OUT/s21_3_hashes.txt"
timeout 150 python3 benchmarks/decode_bandwidth.py 2>&1 | grep -v "$F" > "$OUT/s21_3_decode_bandwidth.txt"
timeout $((560 - SECONDS)) python3 benchmarks/decode_breakdown.py 3026 --merge-only 2>&1 | grep -v "$F" \
  > "$OUT/s21_3_merge_unroll.txt"
cat "$OUT/s21_3_decode_bandwidth.txt" "$OUT/s21_3_merge_unroll.txt"; tail -4 "$OUT/s21_3_hashes.txt"
