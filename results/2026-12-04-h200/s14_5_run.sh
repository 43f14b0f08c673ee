#!/usr/bin/env bash
# Session 14, run 5 (device tool, from the repo root): the rest of the GPU suite (everything but
# run 4's files, the TPU-interpret tests, the notebooks and the multi-device tests), 8 workers.
# Cut at 98% by the 330 s limit: 371 passed, 9 skipped, 0 failed, 2 started and unfinished.
# $OUT/pytest.log is kept here as s14_5_pytest_cut.log.
timeout 330 env BENCH="" XLA_PYTHON_CLIENT_PREALLOCATE=false bash scripts/gpu_suite.sh -n 8 tests \
  --ignore=tests/test_tpu_interpret.py --ignore=tests/test_notebooks.py --ignore=tests/test_parallel.py \
  --deselect tests/test_generate.py --deselect tests/test_model.py --deselect tests/test_nn.py \
  --deselect tests/test_reductions.py
