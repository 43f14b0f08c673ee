#!/usr/bin/env bash
# s9-2: where XLA's sum breaks on the H200 (test control shapes); kernel profile of the fused transform
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 90 python results/2026-12-02-h200/s9_2_sum_controls.py 2>&1 | grep -v "^WARNING" | tee $OUT/s9_2_sum_controls.txt
timeout 200 python scripts/profile_transform.py --batch 8 --prompt 512 --top 22 > $OUT/s9_2_profile_transform_b8.txt 2>&1
echo "profile rc $?"; grep -v "^WARNING" $OUT/s9_2_profile_transform_b8.txt
