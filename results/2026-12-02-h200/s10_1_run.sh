#!/usr/bin/env bash
# s10-1: decode state trimmed to the real rows (bit-neutral); ATTN_SPLIT_K sweep 1024/512/256/128;
# jax's Mosaic GPU attention vs cuDNN on the prefill shapes.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices()[0].device_kind)"
D=results/2026-12-02-h200
for sk in 1024 256 128; do
  rm -rf /tmp/r$sk; mkdir -p /tmp/r$sk; cp -r detjax pallas_kernels benchmarks /tmp/r$sk/
  sed -i "s/^ATTN_SPLIT_K = 1024/ATTN_SPLIT_K = $sk/" /tmp/r$sk/pallas_kernels/order.py
  (cd /tmp/r$sk && PYTHONPATH=/tmp/r$sk timeout 130 python $OLDPWD/$D/s10_1_split_sweep.py) 2>&1 | grep -v "^WARNING" | tee $OUT/s10_1_split_$sk.txt
done
PYTHONPATH=$PWD timeout 200 python $D/s10_1_mgpu_attn.py 2>&1 | grep -v "^WARNING" | tee $OUT/s10_1_mgpu_attn.txt
