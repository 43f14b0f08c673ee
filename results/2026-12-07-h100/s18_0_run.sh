#!/usr/bin/env bash
# Session 18, run 0 (device tool), from the repo root, as run: the 24 output hashes against the
# H100's of session 17 (s17_0_hashes_h100.json), the decode breakdown and the unpadded-rows A/B, then the
# 27 GPU tests that did not finish inside session 17's calls (s18_unfinished_tests.txt) and the decode
# tests (the unpadded decode rows of this session); the list run is s18_0_tests.txt.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false; F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/s18_0_device.txt
timeout 100 python3 scripts/output_hashes.py --json $OUT/s18_0_hashes.json --compare results/2026-12-07-h100/s17_0_hashes_h100.json 2>&1 | grep -v "$F" > $OUT/s18_0_hashes.txt
timeout 110 python3 results/2026-12-07-h100/s18_decode_breakdown.py 2>&1 | grep -v "$F" > $OUT/s18_0_breakdown.txt
timeout 90 python3 -m pytest -v -p no:cacheprovider -rfEs -n 8 $(cat results/2026-12-07-h100/s18_0_tests.txt) > $OUT/s18_0_pytest.log 2>&1
cat $OUT/s18_0_device.txt; tail -28 $OUT/s18_0_hashes.txt; grep -v "^      " $OUT/s18_0_breakdown.txt; grep -a "FAILED\|ERROR" $OUT/s18_0_pytest.log | tail -8; tail -1 $OUT/s18_0_pytest.log
