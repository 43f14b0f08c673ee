#!/usr/bin/env bash
# Session 14, run 2 (device tool, from the repo root): run 1 again after the RMSNorm fix (a
# mask-free chunk loaded the scale with other= and no mask): the GPU tests of the row kernels and
# the matmul dispatch, the output hashes (must equal s13-4's), and s14_1_bench.py's rows, matmul
# and vmap parts.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 230 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_matmul_mgpu.py \
  tests/test_reductions.py "tests/test_matmul.py::test_gpu_configs_bitwise_identical" \
  -k "(resident and (bf16 or f32) and (1000 or 1024 or 1025 or 4096 or 8192)) or (unrolled and bfloat16) or nan_inf or configs or mgpu" \
  2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tail -12 | tee $OUT/s14_2_pytest.log
timeout 70 python3 scripts/output_hashes.py --json "$OUT/s14_2_hashes.json" 2>&1 | tail -n 3 | tee "$OUT/s14_2_hashes.txt"
timeout 200 python3 results/2026-12-04-h200/s14_1_bench.py rows,matmul,vmap 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tee $OUT/s14_2_bench.txt
