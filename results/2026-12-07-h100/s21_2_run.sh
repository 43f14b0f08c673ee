#!/usr/bin/env bash
# AS RUN: collected 0 items under xdist on the GPU machine (parametrized ids on the command line);
# superseded by s21_4_run.sh (DETJAX_NODEIDS).
# Session 21, run 2, from the repo root: the GPU tests earlier calls left unfinished: the float32
# case of the block-step select test (session 20) and session 17's list
# (results/2026-12-07-h100/s17_unfinished_tests.txt), on 8 xdist workers.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s21_2_device.txt"
mapfile -t T < results/2026-12-07-h100/s17_unfinished_tests.txt   # ids with spaces stay whole
timeout 560 python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 \
  "tests/test_attention.py::test_block_step_selects_do_not_change_bits[float32]" \
  "${T[@]}" 2>&1 | grep -v "$F" > "$OUT/s21_2_pytest.log"
grep -c PASSED "$OUT/s21_2_pytest.log"; grep "FAILED\|ERROR" "$OUT/s21_2_pytest.log" | head -20
tail -3 "$OUT/s21_2_pytest.log"
