#!/usr/bin/env bash
# Session 13, run 4 (device tool, from the repo root): the Mosaic decode-matmul dispatch on the
# default path: its GPU tests, the Triton matmul GPU tests it must not disturb, the output hashes
# (must equal s12-3's: the dispatch is bit-neutral), the model-level bits check, gemma2_2b generation.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_matmul_mgpu.py 2>&1 | tail -8 | tee $OUT/s13_4_pytest_mgpu.log
timeout 70 python3 scripts/output_hashes.py --json "$OUT/s13_4_hashes.json" 2>&1 | tail -n 20 | tee "$OUT/s13_4_hashes.txt"
timeout 110 python3 results/2026-12-04-h200/s13_4_model_bits.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tail -8 | tee $OUT/s13_4_model_bits.txt
timeout 220 python3 benchmarks/bench_model.py --model gemma2_2b --batches 8 --prompt 512 --new-tokens 256 \
  --skip-forward --mosaic --gen-iters 2 --json $OUT/s13_4_model.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -12 | tee $OUT/s13_4_model.txt
