#!/usr/bin/env bash
# Session 16, run 2 (device tool, from the repo root): the whole GPU suite at HEAD in one call
# (everything but the TPU-interpret tests, the notebooks and the multi-device tests), 8 workers.
# gpu_suite.sh writes $OUT/env.txt and $OUT/pytest.log (kept here as s16_2_env.txt, s16_2_pytest.log).
timeout 560 env BENCH="" XLA_PYTHON_CLIENT_PREALLOCATE=false bash scripts/gpu_suite.sh -n 8 tests \
  --ignore=tests/test_tpu_interpret.py --ignore=tests/test_notebooks.py --ignore=tests/test_parallel.py
grep -a "FAILED\|passed\|failed" $OUT/pytest.log | tail -8
