#!/usr/bin/env bash
# s8-1: glue fusions (rope+scale, geglu, logits cast+cap) on the GPU: model tests, unverified tests, hashes, B64 fwd profile
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 290 python -m pytest -n 6 -v -p no:cacheprovider -rfE tests/test_model.py tests/test_generate.py tests/test_nn.py tests/test_seal.py \
  "tests/test_attention.py::test_opposite_infinities_in_different_blocks_give_nan" \
  "tests/test_matmul.py::test_gpu_grouped_matches_matmul" > $OUT/s8_1_tests.log 2>&1
echo "pytest rc $?"; tail -3 $OUT/s8_1_tests.log; grep -E "FAILED|ERROR" $OUT/s8_1_tests.log | head -20
timeout 90 python scripts/output_hashes.py > $OUT/s8_1_hashes.txt 2>&1; cat $OUT/s8_1_hashes.txt
timeout 190 python .diag/profile_fwd.py 64 128 > $OUT/s8_1_profile_b64.txt 2>&1; cat $OUT/s8_1_profile_b64.txt | grep -v "^WARNING"
