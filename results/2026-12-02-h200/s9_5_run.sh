#!/usr/bin/env bash
# s9-5: + sibling projections in one launch: GPU tests (fusion, transform), transform benchmark B8/B1
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 220 python -m pytest -n 4 -v -p no:cacheprovider -rfE tests/test_fusion.py tests/test_transform.py > $OUT/s9_5_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s9_5_tests.log; grep -E "FAILED|ERROR" $OUT/s9_5_tests.log | head -20
timeout 250 python benchmarks/bench_model.py --model gemma2_2b --batches 1,8 --prompt 512 --transform --unfused --iters 5 --json $OUT/s9_5_bench_transform.json > $OUT/s9_5_bench_transform.txt 2>&1
echo "bench rc $?"; grep -v "^WARNING" $OUT/s9_5_bench_transform.txt | tail -4
