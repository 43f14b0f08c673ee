#!/usr/bin/env bash
# s10-5 (an H100, nvidia-h100-x1): output hashes (same bits as the H200's s10-3?), decode states
# before/after, attention benchmark, gemma2_2b generation B8/B64 at 256 new tokens
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
D=results/2026-12-02-h200
timeout 70 python scripts/output_hashes.py --json $OUT/s10_5_output_hashes_h100.json > $OUT/s10_5_output_hashes_h100.txt 2>&1; grep -v "^WARNING" $OUT/s10_5_output_hashes_h100.txt | tail -15
timeout 100 python $D/s10_2_decode_before_after.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_5_decode_h100.txt
timeout 90 python benchmarks/bench_kernels.py --only attn --json $OUT/s10_5_bench_attn_h100.json > $OUT/s10_5_bench_attn_h100.txt 2>&1
grep -v "^WARNING" $OUT/s10_5_bench_attn_h100.txt | tail -12
timeout 180 python benchmarks/bench_model.py --model gemma2_2b --batches 8,64 --prompt 512 --new-tokens 256 --skip-forward --json $OUT/s10_5_bench_gen_h100.json > $OUT/s10_5_bench_gen_h100.txt 2>&1
grep -v "^WARNING" $OUT/s10_5_bench_gen_h100.txt | tail -3
