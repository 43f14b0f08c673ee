#!/usr/bin/env bash
# Session 12, run 1 (device tool, from the repo root): Mosaic decode with one compute warpgroup
# (s12_1_decode_wgs.py: speed + same bits), then the Mosaic attention GPU tests (decode now takes
# the one-warpgroup CTAs) and the model test session 11 left unrun (forward batch invariance, h256).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 170 python3 results/2026-12-03-h200/s12_1_decode_wgs.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee $OUT/decode_wgs.txt
timeout 230 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_mosaic_attention.py -k gpu 2>&1 | tail -25 | tee $OUT/pytest_mosaic.log
timeout 170 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_model_mosaic.py -k "forward_batch" 2>&1 | tail -15 | tee $OUT/pytest_model.log
