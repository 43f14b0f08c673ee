#!/usr/bin/env bash
# Session 13, run 3 (device tool, from the repo root): the Mosaic GPU decode-matmul probe, Lane semantics, 16-128-wide N tiles.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 400 python3 results/2026-12-04-h200/s13_3_mgpu_matmul.py 330 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" | tee $OUT/s13_3_mgpu_matmul.txt
