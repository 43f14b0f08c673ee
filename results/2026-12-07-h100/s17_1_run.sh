#!/usr/bin/env bash
# Session 17, run 1 (device tool, the same warm NVIDIA H100 as run 0), from the repo root, as run
# (one line, here split): the other two thirds of the GPU suite (DETJAX_SHARD=1/3 and 2/3, 165 s
# each: both were cut by that limit, 4 and 19 tests unfinished), then the matmul and row-kernel
# benchmarks (90 s) and the attention benchmark (100 s: cut after 9 of its 16 prefill shapes; the
# other 7 ran as runs 2 and 3, decode as run 4).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false; F="^WARNING\|^I0000\|^W0000\|^E0000"
for s in 1 2; do
  timeout 165 env DETJAX_SHARD=$s/3 BENCH="" bash scripts/gpu_suite.sh -n 8 tests --ignore=tests/test_tpu_interpret.py \
    --ignore=tests/test_notebooks.py --ignore=tests/test_parallel.py > /dev/null 2>&1
  cp $OUT/pytest.log $OUT/s17_1_suite_shard${s}of3.log; rm -f $OUT/pytest.log $OUT/env.txt $OUT/junit.xml
done
timeout 90 python3 benchmarks/bench_kernels.py --only matmul,rows --iters 20 --json $OUT/s17_1_bench.json 2>&1 | grep -v "$F" > $OUT/s17_1_bench.txt
timeout 100 python3 benchmarks/bench_kernels.py --only attn --iters 10 --json $OUT/s17_1_bench_attn.json 2>&1 | grep -v "$F" > $OUT/s17_1_bench_attn.txt
for s in 1 2; do grep -a "FAILED\|ERROR" $OUT/s17_1_suite_shard${s}of3.log | tail -5; tail -1 $OUT/s17_1_suite_shard${s}of3.log; done
sed -n '/^device:/,$p' $OUT/s17_1_bench.txt; tail -2 $OUT/s17_1_bench.txt; grep "ratio" $OUT/s17_1_bench_attn.txt | tail -45
