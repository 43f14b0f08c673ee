#!/usr/bin/env bash
# Session 12, run 2 (device tool, from the repo root): the same-bits test of the CTA height /
# pipeline slots / value-column split (fixed: 3 slots only where they fit), decode = prefill with
# the new decode defaults, the model's Mosaic GPU tests, then gemma2_2b B8 generation.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_mosaic_attention.py -k "cta_height or decode_equals_prefill" 2>&1 | tail -8 | tee $OUT/pytest_mosaic.log
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_model_mosaic.py -k "gpu and not forward_batch" 2>&1 | tail -8 | tee $OUT/pytest_model.log
timeout 230 python3 benchmarks/bench_model.py --model gemma2_2b --batches 8 --prompt 512 --new-tokens 256 \
  --skip-forward --mosaic --gen-iters 2 --json $OUT/model.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
