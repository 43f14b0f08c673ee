#!/usr/bin/env bash
# s8-4: official forward benchmark (B1, B8 prompt 512; B64 prompt 128) and the transform's forward profile
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 200 python benchmarks/bench_model.py --model gemma2_2b --batches 1,8 --prompt 512 --skip-generate --json $OUT/s8_4_bench_fwd_p512.json > $OUT/s8_4_bench_fwd_p512.txt 2>&1
grep -v "^WARNING" $OUT/s8_4_bench_fwd_p512.txt
timeout 150 python benchmarks/bench_model.py --model gemma2_2b --batches 64 --prompt 128 --iters 3 --skip-generate --json $OUT/s8_4_bench_fwd_b64_p128.json > $OUT/s8_4_bench_fwd_b64_p128.txt 2>&1
grep -v "^WARNING" $OUT/s8_4_bench_fwd_b64_p128.txt
timeout 200 python .diag/profile_transform.py 8 512 > $OUT/s8_4_profile_transform_b8.txt 2>&1
grep -v "^WARNING" $OUT/s8_4_profile_transform_b8.txt
