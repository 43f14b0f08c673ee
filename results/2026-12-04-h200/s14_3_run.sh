#!/usr/bin/env bash
# Session 14, run 3 (device tool, from the repo root): what run 2 left: the f32 case of the tile
# configs test (cut by run 2's time limit), the vmap checks of the Mosaic matmul on the GPU (run 2
# stopped at a wrong import in the script), and gemma2_2b B8 generation, old vs new rules.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 60 python3 -m pytest -q -p no:cacheprovider -rfEs "tests/test_matmul.py::test_gpu_configs_bitwise_identical" \
  2>&1 | tail -3 | tee $OUT/s14_3_pytest.log
timeout 60 python3 results/2026-12-04-h200/s14_1_bench.py vmap 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tee $OUT/s14_3_vmap.txt
timeout 330 python3 results/2026-12-04-h200/s14_1_bench.py gen 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tee $OUT/s14_3_gen.txt
