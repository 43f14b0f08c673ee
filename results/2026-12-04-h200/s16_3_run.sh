#!/usr/bin/env bash
# Session 16, run 3 (device tool, from the repo root): the two s16-2 failures, after the test fixes,
# and the one test s16-2 left unfinished at its call limit. s16_3_seeds.py shows the matmul
# accuracy failure is the old error measure on a lone output (cancellation), not the kernel.
# The control ran here was an intermediate version (two shapes, rows 0/5/15 and the first 7): it
# failed in the first of the three runs (output cut by tail; runs 4 and 5 found why). The committed
# test checks every row of the bf16 shape alone.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
F="^WARNING\|^I0000\|^W0000\|^E0000"
timeout 100 python3 results/2026-12-04-h200/s16_3_seeds.py 2>&1 | grep -v "$F" | tee $OUT/s16_3_seeds.txt
for i in 1 2 3; do
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_fusion.py::test_plain_xla_attention_control \
    $([ $i = 1 ] && echo tests/test_matmul.py::test_accuracy_vs_float64 \
      "tests/test_attention.py::test_decode_single_split_kernel_gives_the_two_kernel_bits") 2>&1 | grep -v "$F" | tail -4
done | tee $OUT/s16_3_pytest.log
