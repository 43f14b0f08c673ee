#!/usr/bin/env bash
# s9-7: final code: tests/test_fusion.py (incl. jax.nn.dot_product_attention) and tests/test_transform.py on the GPU
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 240 python -m pytest -n 4 -v -p no:cacheprovider -rfEs tests/test_fusion.py tests/test_transform.py > $OUT/s9_7_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s9_7_tests.log; grep -E "FAILED|ERROR" $OUT/s9_7_tests.log | head -20
