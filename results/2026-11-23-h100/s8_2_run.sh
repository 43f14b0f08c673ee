#!/usr/bin/env bash
# s8-2: matmul without N padding: GPU matmul tests, model tests, hashes, B64 fwd profile, fwd bench
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 300 python -m pytest -n 6 -v -p no:cacheprovider -rfE tests/test_matmul.py tests/test_model.py tests/test_generate.py > $OUT/s8_2_tests.log 2>&1
echo "pytest rc $?"; tail -2 $OUT/s8_2_tests.log; grep -E "FAILED|ERROR" $OUT/s8_2_tests.log | head -20
timeout 80 python scripts/output_hashes.py > $OUT/s8_2_hashes.txt 2>&1; cat $OUT/s8_2_hashes.txt
timeout 200 python .diag/profile_fwd.py 64 128 > $OUT/s8_2_profile_b64.txt 2>&1; grep -v "^WARNING" $OUT/s8_2_profile_b64.txt | head -40
