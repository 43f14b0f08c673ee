#!/usr/bin/env bash
# s8-9: fused residual + RMSNorm (bf16/f16): GPU tests of everything session 8 touched, hashes
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 430 python -m pytest -n 6 -v -p no:cacheprovider -rfE tests/test_reductions.py tests/test_model.py tests/test_generate.py tests/test_nn.py \
  tests/test_checkpoint.py tests/test_check.py tests/test_bad_input.py tests/test_transform.py tests/test_gather.py > $OUT/s8_9_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s8_9_tests.log; grep -E "FAILED|ERROR" $OUT/s8_9_tests.log | head -20; grep -c PASSED $OUT/s8_9_tests.log
timeout 80 python scripts/output_hashes.py > $OUT/s8_9_output_hashes.txt 2>&1; cat $OUT/s8_9_output_hashes.txt
