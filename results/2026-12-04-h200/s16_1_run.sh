#!/usr/bin/env bash
# Session 16, run 1 (device tool, from the repo root): output hashes at HEAD (must equal s15-1's),
# gemma2_2b generation at B8 and B1 (XLA vs detjax with the one-kernel decode off / on), then the
# two GPU tests s14-5 left unfinished at its call limit.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
F="^WARNING\|^I0000\|^W0000\|^E0000"
timeout 80 python3 scripts/output_hashes.py --json "$OUT/s16_1_hashes.json" 2>&1 | grep -v "$F" | tee "$OUT/s16_1_hashes.txt"
timeout 330 python3 results/2026-12-04-h200/s15_1_bench.py gen 8,1 2>&1 | grep -v "$F" | tee $OUT/s16_1_gen.txt
timeout 170 python3 -m pytest -v -p no:cacheprovider -rfEs \
  "tests/test_attention.py::test_gpu_warp_count_does_not_change_bits" \
  "tests/test_mosaic_attention.py::test_gpu_cta_height_gives_the_same_bits" 2>&1 | grep -v "$F" | tail -8 | tee $OUT/s16_1_pytest.log
