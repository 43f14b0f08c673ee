#!/usr/bin/env bash
# Session 12, run 4 (device tool, from the repo root): every GPU test of the Mosaic attention with
# the final decode defaults (one compute warpgroup, value-column split by default_value_splits).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 280 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_mosaic_attention.py -k gpu 2>&1 | tail -8 | tee $OUT/pytest_mosaic.log
