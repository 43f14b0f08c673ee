#!/usr/bin/env bash
# s10-4: after the decode-state change: attention benchmark (prefill vs xla/cudnn, decode % of copy)
# and gemma2_2b greedy generation B1/8/64, prompt 512, 256 new tokens (the performance issue's shape)
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python benchmarks/bench_kernels.py --only attn --json $OUT/s10_4_bench_attn.json > $OUT/s10_4_bench_attn.txt 2>&1
grep -v "^WARNING" $OUT/s10_4_bench_attn.txt | tail -14
timeout 400 python benchmarks/bench_model.py --model gemma2_2b --batches 8,1,64 --prompt 512 --new-tokens 256 --skip-forward --json $OUT/s10_4_bench_gen.json > $OUT/s10_4_bench_gen.txt 2>&1
grep -v "^WARNING" $OUT/s10_4_bench_gen.txt | tail -5
