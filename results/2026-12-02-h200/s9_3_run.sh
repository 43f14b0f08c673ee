#!/usr/bin/env bash
# s9-3: + elementwise clusters and the residual norm: GPU tests, transform benchmark, kernel profile
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 220 python -m pytest -n 4 -v -p no:cacheprovider -rfE tests/test_fusion.py tests/test_transform.py > $OUT/s9_3_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s9_3_tests.log; grep -E "FAILED|ERROR" $OUT/s9_3_tests.log | head -20
timeout 200 python benchmarks/bench_model.py --model gemma2_2b --batches 8,1 --prompt 512 --transform --iters 5 --json $OUT/s9_3_bench_transform.json > $OUT/s9_3_bench_transform.txt 2>&1
echo "bench rc $?"; grep -v "^WARNING" $OUT/s9_3_bench_transform.txt | tail -4
timeout 150 python scripts/profile_transform.py --batch 8 --prompt 512 --top 14 > $OUT/s9_3_profile_transform_b8.txt 2>&1
echo "profile rc $?"; grep -v "^WARNING" $OUT/s9_3_profile_transform_b8.txt
