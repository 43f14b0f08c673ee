#!/usr/bin/env bash
# s9-1: fused patterns of deterministic(): GPU tests, transform benchmark (fused / unfused / nn / XLA)
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())"; } > $OUT/s9_1_env.txt 2>&1
cat $OUT/s9_1_env.txt
timeout 230 python -m pytest -n 4 -v -p no:cacheprovider -rfE tests/test_fusion.py tests/test_transform.py > $OUT/s9_1_tests.log 2>&1
echo "pytest rc $?"; tail -1 $OUT/s9_1_tests.log; grep -E "FAILED|ERROR" $OUT/s9_1_tests.log | head -20
timeout 300 python benchmarks/bench_model.py --model gemma2_2b --batches 8,1 --prompt 512 --transform --unfused --iters 3 --json $OUT/s9_1_bench_transform.json > $OUT/s9_1_bench_transform.txt 2>&1
echo "bench rc $?"; grep -v "^WARNING" $OUT/s9_1_bench_transform.txt | tail -6
