#!/usr/bin/env bash
# Session 24, run 3 (prepared, NOT YET RUN: no device time was left), from the repo root:
# 1. the 7 split-order GPU tests (decode = prefill at 12 positions, head dims 64/128/256, bf16/f16,
#    each variant compiled once; accuracy); 2. output hashes against s24-1 (the .rn merges are in
#    the split order only: no default bit may move); 3. mosaic_splits.py --quick (prefill with the
#    register total at head dim 128; the decode rows s24-2 did not reach); 4. s24_3_merge_cost.py.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s24_3_device.txt"
timeout $((200 - SECONDS)) python3 -m pytest -v -p no:cacheprovider -rfEs tests/test_mosaic_attention.py \
  -k "split_order" 2>&1 | grep --line-buffered -v "$F" > "$OUT/s24_3_pytest.log"
grep "PASSED\|FAILED\|ERROR\|passed\|failed" "$OUT/s24_3_pytest.log" | tail -12
timeout $((330 - SECONDS)) python3 scripts/output_hashes.py --json "$OUT/s24_3_hashes.json" \
  --compare results/2026-12-07-h100-s24/s24_1_hashes.json 2>&1 | grep -v "$F" > "$OUT/s24_3_hashes.txt"
tail -3 "$OUT/s24_3_hashes.txt"
timeout $((470 - SECONDS)) python3 benchmarks/mosaic_splits.py --quick 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s24_3_bench.txt"
cat "$OUT/s24_3_bench.txt"
timeout $((585 - SECONDS)) python3 results/2026-12-07-h100-s24/s24_3_merge_cost.py 2>&1 \
  | grep --line-buffered -v "$F" > "$OUT/s24_3_merge_cost.txt"
cat "$OUT/s24_3_merge_cost.txt"
