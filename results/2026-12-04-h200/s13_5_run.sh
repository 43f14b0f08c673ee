#!/usr/bin/env bash
# Session 13, run 5 (device tool, from the repo root): gemma2_2b B64 generation, Mosaic decode-matmul
# dispatch off and on.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 230 python3 results/2026-12-04-h200/s13_5_gen_b64.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tail -5 | tee $OUT/s13_5_gen_b64.txt
