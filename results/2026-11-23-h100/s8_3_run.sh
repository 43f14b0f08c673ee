#!/usr/bin/env bash
# s8-3: decode-step profile and generation after the glue fusions and N masking
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 150 python scripts/profile_decode_step.py --batch 8 --cache 512 --loop-steps 64 > $OUT/s8_3_profile_decode_b8.txt 2>&1
grep -v "^WARNING" $OUT/s8_3_profile_decode_b8.txt | head -60
timeout 400 python benchmarks/bench_model.py --model gemma2_2b --batches 8,64,1 --prompt 512 --new-tokens 128 --skip-forward --json $OUT/s8_3_bench_gen.json > $OUT/s8_3_bench_gen.txt 2>&1
grep -v "^WARNING" $OUT/s8_3_bench_gen.txt
