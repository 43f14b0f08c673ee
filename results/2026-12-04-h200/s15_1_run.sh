#!/usr/bin/env bash
# Session 15, run 1 (device tool, from the repo root): the one-kernel decode of a single-split cache
# (attention.DECODE_FUSE_SINGLE_SPLIT): output hashes (must equal s14-2's), decode A/B and the
# warps/stages sweep, then the GPU tests of attention, generation and the model.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
F="^WARNING\|^I0000\|^W0000\|^E0000"
timeout 80 python3 scripts/output_hashes.py --json "$OUT/s15_1_hashes.json" 2>&1 | grep -v "$F" | tee "$OUT/s15_1_hashes.txt"
timeout 150 python3 results/2026-12-04-h200/s15_1_bench.py decode,sweep 2>&1 | grep -v "$F" | tee $OUT/s15_1_bench.txt
timeout 300 env BENCH="" XLA_PYTHON_CLIENT_PREALLOCATE=false bash scripts/gpu_suite.sh -n 8 \
  tests/test_attention.py tests/test_generate.py tests/test_model.py > $OUT/s15_1_pytest.log 2>&1
grep -a "FAILED\|passed\|failed" $OUT/s15_1_pytest.log | tail -8
