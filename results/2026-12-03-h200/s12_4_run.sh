#!/usr/bin/env bash
# Session 12, run 4 (device tool, from the repo root): the Mosaic attention GPU tests that s12-2
# did not rerun with the final decode defaults (chunked prefill's 1-token chunk takes the
# one-warpgroup CTAs with a value split), plus accuracy and batch/vmap.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_mosaic_attention.py -k "gpu and (chunked or accuracy or batch_and_vmap)" 2>&1 | tail -8 | tee $OUT/pytest_mosaic.log
