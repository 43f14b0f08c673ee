#!/usr/bin/env bash
# Session 18, run 2 (device tool), from the repo root, as run: with under 5 device-minutes left after
# failed machine starts, only the unpadded decode rows A/B (DECODE_UNPADDED_ROWS off / on: time, and
# the bits at ragged lengths; bf16, and f16 at one shape).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/s18_2_device.txt
timeout 85 python3 results/2026-12-07-h100/s18_decode_breakdown.py --ab-only 2>&1 | grep -v "$F" | tee $OUT/s18_2_ab.txt
cat $OUT/s18_2_device.txt
