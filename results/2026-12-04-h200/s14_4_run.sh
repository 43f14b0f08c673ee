#!/usr/bin/env bash
# Session 14, run 4 (device tool, from the repo root): the GPU suite's model, generation, nn and
# row-kernel tests with the session-14 defaults, 6 pytest workers (without
# XLA_PYTHON_CLIENT_PREALLOCATE=false each worker reserves most of the GPU memory and they OOM).
# gpu_suite.sh writes $OUT/env.txt and $OUT/pytest.log (kept here as s14_4_env.txt, s14_4_pytest.log).
timeout 400 env BENCH="" XLA_PYTHON_CLIENT_PREALLOCATE=false bash scripts/gpu_suite.sh -n 6 \
  tests/test_generate.py tests/test_model.py tests/test_nn.py tests/test_reductions.py
