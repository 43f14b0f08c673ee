#!/usr/bin/env bash
# s10-3: decode states for the real rows only: before/after (time, bits); GPU attention tests
# (decode, q tile, batch/vmap invariance; bf16/f16); output hashes
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
D=results/2026-12-02-h200
timeout 150 python $D/s10_2_decode_before_after.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_3_decode.txt
timeout 230 python -m pytest -n 4 -v -p no:cacheprovider -rfE tests/test_attention.py \
  -k "(decode or q_tile or real_rows or batch_invariance or vmap or chunked or guarded or empty_rows) and not float32" > $OUT/s10_3_tests.log 2>&1
echo "pytest rc $?"; tail -n 1 $OUT/s10_3_tests.log; grep -E "FAILED|ERROR" $OUT/s10_3_tests.log | head
timeout 80 python scripts/output_hashes.py --json $OUT/s10_3_output_hashes.json > $OUT/s10_3_output_hashes.txt 2>&1; grep -v "^WARNING" $OUT/s10_3_output_hashes.txt | tail -15
