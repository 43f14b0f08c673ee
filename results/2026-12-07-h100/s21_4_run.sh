#!/usr/bin/env bash
# Session 21, run 4, from the repo root: GPU tests, 8 xdist workers, selected by DETJAX_NODEIDS
# (s21_4_tests.txt): test_attention.py's decode / batch / vmap / merge-unroll tests with the new
# decode default (unpadded rows), the float32 block-step select test (session 20) and the tests
# session 17 left unfinished (s17_unfinished_tests.txt).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s21_4_device.txt"
L=results/2026-12-07-h100/s21_4_tests.txt
DETJAX_NODEIDS=$L timeout 400 python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 \
  $(cut -d: -f1 $L | sort -u) 2>&1 | grep --line-buffered -v "$F" > "$OUT/s21_4_pytest.log"
grep -c PASSED "$OUT/s21_4_pytest.log"; grep "FAILED\|ERROR" "$OUT/s21_4_pytest.log" | head -20
tail -2 "$OUT/s21_4_pytest.log"
