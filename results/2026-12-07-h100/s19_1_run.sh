#!/usr/bin/env bash
# Session 19, run 1 (device tool, asked for nvidia-h200, given an NVIDIA H100 80GB HBM3), run at
# commit c91b652 from the repo root (as results/2026-12-07-s19/s19_1_run.sh; moved here after): a lean form of s19-0 (the session's device
# time was nearly spent on failed starts): the split-parallel prefill A/B at the T = 8192 shapes
# and B8 T2048 H256 (bits and time), its GPU test, then output hashes against s17-0 (H100) with
# whatever time is left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s19_1_device.txt"
timeout 200 python3 benchmarks/prefill_split_parallel.py --lean 2>&1 | grep -v "$F" | tee "$OUT/s19_1_prefill_sp.txt"
timeout 110 python3 -m pytest -v -p no:cacheprovider -rfEs -n 3 \
  tests/test_attention.py::test_prefill_split_parallel_gives_the_one_kernel_bits 2>&1 | grep -v "$F" \
  | tee "$OUT/s19_1_pytest.log" | tail -4
timeout $((400 - SECONDS)) python3 scripts/output_hashes.py --json "$OUT/s19_1_hashes.json" \
  --compare results/2026-12-07-h100/s17_0_hashes_h100.json 2>&1 | grep -v "$F" | tee "$OUT/s19_1_hashes.txt" | tail -3
