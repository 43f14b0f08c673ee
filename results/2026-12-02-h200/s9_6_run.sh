#!/usr/bin/env bash
# s9-6: the attention negative control and the fuse=False test on the GPU
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 150 python -m pytest -v -p no:cacheprovider -rfEs tests/test_fusion.py -k "control or fusion_off or equals_detjax_attention" > $OUT/s9_6_tests.log 2>&1
echo "pytest rc $?"; grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" $OUT/s9_6_tests.log | tail -8
