#!/usr/bin/env bash
# Session 13, run 2 (device tool, from the repo root): the Mosaic GPU decode-matmul probe.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 420 python3 results/2026-12-04-h200/s13_2_mgpu_matmul.py 360 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" | tee $OUT/s13_2_mgpu_matmul.txt
