#!/usr/bin/env bash
# Session 22, run 4, from the repo root (inline in the device call, as run): the float32 case of the
# block-step select test alone, one process, 430 s.
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s22_4_device.txt
timeout 430 python3 -m pytest -v -p no:cacheprovider -rfEs tests/test_attention.py \
  -k "block_step_selects and float32" 2>&1 | grep --line-buffered -v "^WARNING\|^I0000\|^W0000\|^E0000" \
  > $OUT/s22_4_pytest.log
tail -3 $OUT/s22_4_pytest.log
