#!/usr/bin/env bash
# Session 13, run 5 (device tool, from the repo root): gemma2_2b B64 generation with the Mosaic
# decode-matmul dispatch off (DETJAX_MOSAIC_MATMUL=0, every matmul on Triton) and on.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for on in 0 1; do
DETJAX_MOSAIC_MATMUL=$on timeout 140 python3 benchmarks/bench_model.py --model gemma2_2b --batches 64 --prompt 512 --new-tokens 256 \
  --skip-forward --gen-iters 2 --json $OUT/s13_5_model_mm$on.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -3 | sed "s/^/DETJAX_MOSAIC_MATMUL=$on /" | tee -a $OUT/s13_5_model.txt
done
