#!/usr/bin/env bash
# Session 11, run 3 (device tool, from the repo root): gemma2_2b greedy generation at B8, prompt 512,
# 256 new tokens: plain XLA, detjax (Triton attention) and attention_kernel='mosaic'.
PYTHONUNBUFFERED=1 PYTHONPATH=$PWD timeout 320 python3 benchmarks/bench_model.py --model gemma2_2b \
  --batches 8 --prompt 512 --new-tokens 256 --skip-forward --mosaic --gen-iters 2 --json $OUT/model.json
