#!/usr/bin/env bash
# Session 18, run 1 (device tool), from the repo root, as run: the minimum left after failed machine
# starts (run 0's machine was taken back before it finished; nothing came back): the 24 output
# hashes against the H100's of session 17, and the unpadded decode rows A/B (time, bits).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/s18_1_device.txt
timeout 125 python3 scripts/output_hashes.py --json $OUT/s18_1_hashes.json --compare results/2026-12-07-h100/s17_0_hashes_h100.json 2>&1 | grep -v "$F" > $OUT/s18_1_hashes.txt
timeout 75 python3 results/2026-12-07-h100/s18_decode_breakdown.py --ab-only 2>&1 | grep -v "$F" > $OUT/s18_1_ab.txt
cat $OUT/s18_1_device.txt; tail -28 $OUT/s18_1_hashes.txt; cat $OUT/s18_1_ab.txt
