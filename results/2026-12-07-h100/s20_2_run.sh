#!/usr/bin/env bash
# Session 20, run 2 (a fresh H100, after 10 failed or refused starts; cut by the device budget at 509 s), from the repo root: the block step without its
# selects is the default now; output hashes against s20-1 (computed with the selects), then the
# attention tests (the float32 select test among them), then the A/B of DECODE_UNPADDED_ROWS
# (benchmarks/decode_breakdown.py --ab-only) with the time left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s20_2_device.txt"
timeout 170 python3 scripts/output_hashes.py --json "$OUT/s20_2_hashes.json" \
  --compare results/2026-12-07-h100/s20_1_hashes.json 2>&1 | grep -v "$F" | tee "$OUT/s20_2_hashes.txt" | tail -3
timeout $((480 - SECONDS)) python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 \
  tests/test_attention.py 2>&1 | grep -v "$F" \
  > "$OUT/s20_2_pytest.log"
grep -c PASSED "$OUT/s20_2_pytest.log"; grep "FAILED\|ERROR" "$OUT/s20_2_pytest.log" | head; tail -2 "$OUT/s20_2_pytest.log"
timeout $((575 - SECONDS)) python3 benchmarks/decode_breakdown.py 3026 --ab-only 2>&1 | grep -v "$F" | tee "$OUT/s20_2_unpadded_ab.txt"
