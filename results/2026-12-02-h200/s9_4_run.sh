#!/usr/bin/env bash
# s9-4: kernel profile of the fused transform at batch 1 (where it is 1.21x detjax.nn in s9-3)
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 150 python scripts/profile_transform.py --batch 1 --prompt 512 --top 16 > $OUT/s9_4_profile_transform_b1.txt 2>&1
echo "profile rc $?"; grep -v "^WARNING" $OUT/s9_4_profile_transform_b1.txt
