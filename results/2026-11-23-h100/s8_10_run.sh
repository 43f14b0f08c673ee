#!/usr/bin/env bash
# s8-10: after the fused residual+RMSNorm: residual test, hashes (3 new rows), decode profile, generation + B64 forward
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 60 python -m pytest -n 3 -v -p no:cacheprovider -rfE tests/test_reductions.py -k residual > $OUT/s8_10_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s8_10_tests.log
timeout 90 python scripts/output_hashes.py --json $OUT/s8_10_output_hashes_h100.json > $OUT/s8_10_output_hashes.txt 2>&1; cat $OUT/s8_10_output_hashes.txt
timeout 120 python scripts/profile_decode_step.py --batch 8 --cache 512 --loop-steps 64 > $OUT/s8_10_profile_decode_b8.txt 2>&1
grep -v "^WARNING" $OUT/s8_10_profile_decode_b8.txt | tail -22
timeout 210 python benchmarks/bench_model.py --model gemma2_2b --batches 8,64 --prompt 512 --new-tokens 128 --skip-forward --json $OUT/s8_10_bench_gen.json > $OUT/s8_10_bench_gen.txt 2>&1
grep -v "^WARNING" $OUT/s8_10_bench_gen.txt
timeout 90 python benchmarks/bench_model.py --model gemma2_2b --batches 64 --prompt 128 --iters 3 --skip-generate --json $OUT/s8_10_bench_fwd_b64_p128.json > $OUT/s8_10_bench_fwd_b64_p128.txt 2>&1
grep -v "^WARNING" $OUT/s8_10_bench_fwd_b64_p128.txt
