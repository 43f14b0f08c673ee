#!/usr/bin/env bash
# Session 12, run 3 (device tool, from the repo root): output hashes (the default path must not
# move; the Mosaic rows must not either: the decode changes are bit-neutral), then gemma2_2b
# generation at B1 and B64 with both attention kernels.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 80 python3 scripts/output_hashes.py --json "$OUT/hashes.json" 2>&1 | tail -n 20 | tee "$OUT/hashes.txt"
timeout 420 python3 benchmarks/bench_model.py --model gemma2_2b --batches 1,64 --prompt 512 --new-tokens 256 \
  --skip-forward --mosaic --gen-iters 2 --json $OUT/model.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -12
