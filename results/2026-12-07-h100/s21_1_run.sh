#!/usr/bin/env bash
# Session 21, run 1, from the repo root: where a decode call's time goes (per-kernel CUPTI times of
# XLA, the default split decode and the Mosaic decode at four shapes), the DECODE_UNPADDED_ROWS A/B
# (never run before) and the bit-neutral value-split sweep (benchmarks/decode_breakdown.py
# --value-splits); then whether head dim 64 should take the split-parallel prefill
# (benchmarks/prefill_split_parallel.py --h64: bits and time against the one-kernel prefill).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s21_1_device.txt"
git log -1 --format=%h 2>/dev/null | tee -a "$OUT/s21_1_device.txt"
timeout 330 python3 benchmarks/decode_breakdown.py 3026 --value-splits 2>&1 | grep -v "$F" \
  > "$OUT/s21_1_decode_breakdown.txt"
timeout $((570 - SECONDS)) python3 benchmarks/prefill_split_parallel.py --h64 2>&1 | grep -v "$F" \
  > "$OUT/s21_1_prefill_h64.txt"
echo "== decode breakdown =="; grep -v "^      " "$OUT/s21_1_decode_breakdown.txt"
echo "== prefill h64 =="; cat "$OUT/s21_1_prefill_h64.txt"
