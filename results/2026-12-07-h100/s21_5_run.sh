#!/usr/bin/env bash
# Session 21, run 5, from the repo root (s21-4's DETJAX_NODEIDS selection failed under xdist on the
# GPU machine: INTERNALERROR, 499 items): test_attention.py's decode / batch / vmap / merge-unroll
# tests with the new decode default (unpadded rows) and the float32 block-step select test, chosen
# with -k, 8 xdist workers, with the device time left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s21_5_device.txt"
timeout 330 python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 tests/test_attention.py \
  -k "decode or vmap or batch or invarian or merge_unroll or (block_step_selects and float32)" 2>&1 \
  | grep --line-buffered -v "$F" > "$OUT/s21_5_pytest.log"
grep -c PASSED "$OUT/s21_5_pytest.log"; grep "FAILED\|ERROR" "$OUT/s21_5_pytest.log" | head -20
tail -2 "$OUT/s21_5_pytest.log"
