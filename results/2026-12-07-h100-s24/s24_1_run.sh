#!/usr/bin/env bash
# Session 24, run 1, from the repo root (session 23's prepared s23_2 plus the hash check):
# 1. results/2026-12-07-h200/s23_2_diag.py: why decode = prefill failed at some t with the opt-in key splits
#    (run to run, per batch row, ulps, one-kernel decode, packed prefill);
# 2. output hashes against s22-2 (session 23 refactored the unsplit Mosaic path: no bit may move) and the
#    two new Mosaic rows;
# 3. s23_2_ptxas.py: ptxas register / spill report, split and unsplit kernels.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s24_1_device.txt"
timeout $((200 - SECONDS)) python3 results/2026-12-07-h200/s23_2_diag.py 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s24_1_diag.txt"
cat "$OUT/s24_1_diag.txt"
timeout $((420 - SECONDS)) python3 scripts/output_hashes.py --json "$OUT/s24_1_hashes.json" \
  --compare results/2026-12-07-h100/s22_2_hashes.json 2>&1 | grep -v "$F" > "$OUT/s24_1_hashes.txt"
tail -6 "$OUT/s24_1_hashes.txt"
MOSAIC_GPU_DUMP_PTXAS=1 timeout $((570 - SECONDS)) python3 results/2026-12-07-h200/s23_2_ptxas.py 2>&1 \
  | grep --line-buffered -i "===\|registers\|spill\|stack\|error" > "$OUT/s24_1_ptxas.txt"
cat "$OUT/s24_1_ptxas.txt"
