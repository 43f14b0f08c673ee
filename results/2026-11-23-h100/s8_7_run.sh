#!/usr/bin/env bash
# s8-7: f32 FMA tiles: configs test, upcast model forward + generation, transform forward
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 100 python -m pytest -n 3 -v -p no:cacheprovider -rfE tests/test_matmul.py -k "configs_bitwise or fma or tf32" > $OUT/s8_7_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s8_7_tests.log; grep -E "FAILED|ERROR" $OUT/s8_7_tests.log | head
timeout 230 python benchmarks/bench_model.py --model gemma2_2b --upcast --batches 1,8 --prompt 512 --new-tokens 64 --iters 3 --gen-iters 2 --json $OUT/s8_7_bench_upcast.json > $OUT/s8_7_bench_upcast.txt 2>&1
grep -v "^WARNING" $OUT/s8_7_bench_upcast.txt
timeout 200 python benchmarks/bench_model.py --model gemma2_2b --batches 1,8 --prompt 512 --transform --iters 3 --json $OUT/s8_7_bench_transform.json > $OUT/s8_7_bench_transform.txt 2>&1
grep -v "^WARNING" $OUT/s8_7_bench_transform.txt
