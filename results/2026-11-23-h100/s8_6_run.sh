#!/usr/bin/env bash
# s8-6: f32 FMA tiles: GPU matmul tests, hashes, small-M f32 sweep
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 280 python -m pytest -n 6 -v -p no:cacheprovider -rfE tests/test_matmul.py > $OUT/s8_6_test_matmul.log 2>&1
echo "pytest rc $?"; tail -2 $OUT/s8_6_test_matmul.log; grep -E "FAILED|ERROR" $OUT/s8_6_test_matmul.log | head -20
timeout 80 python scripts/output_hashes.py > $OUT/s8_6_hashes.txt 2>&1; cat $OUT/s8_6_hashes.txt
timeout 200 python .diag/sweep_f32_small.py > $OUT/s8_6_sweep_f32_small.txt 2>&1; grep -v "^WARNING" $OUT/s8_6_sweep_f32_small.txt
