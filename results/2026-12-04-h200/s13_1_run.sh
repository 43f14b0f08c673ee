#!/usr/bin/env bash
# Session 13, run 1 (device tool, from the repo root): the decode matmul tile sweep, then the
# Mosaic attention GPU tests that session 12 left unrun with its final decode defaults.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout 340 python3 results/2026-12-04-h200/s13_1_decode_mm_sweep.py 300 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" | tee $OUT/s13_1_decode_mm_sweep.txt
timeout 220 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_mosaic_attention.py -k "gpu and (chunked or accuracy or batch_and_vmap)" 2>&1 | tail -8 | tee $OUT/s13_1_pytest_mosaic.log
