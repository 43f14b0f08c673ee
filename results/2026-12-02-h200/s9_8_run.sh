#!/usr/bin/env bash
# s9-8: decode = prefill of the transformed plain-XLA model, and the finite-fill rule, on the GPU
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 200 python -m pytest -n 3 -v -p no:cacheprovider -rfEs tests/test_fusion.py -k "decode_equals or finite_fill or gemma_xla_model" > $OUT/s9_8_tests.log 2>&1
echo "pytest rc $?"; grep -E "PASSED|FAILED|ERROR" $OUT/s9_8_tests.log | tail -6; tail -1 $OUT/s9_8_tests.log
