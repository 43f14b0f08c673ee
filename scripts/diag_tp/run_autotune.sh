#!/bin/bash
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for v in base at0; do
  case $v in base) F="";; at0) F="--xla_gpu_autotune_level=0";; esac
  echo "== $v: $F"
  XLA_FLAGS="$F" timeout 80 python scripts/multidevice_check.py --only dp,tp,grad,tpgrad 2>&1 | grep -v Warning | grep -E "tp_grad |tp_train|grad_|FAIL|rror" | head -8
done
