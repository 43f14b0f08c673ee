#!/bin/bash
# TP vs single on 2 GPUs under XLA flag variants (is it FMA contraction / fusion-dependent?)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for v in base fma0 nofusion; do
  case $v in
    base) F="";;
    fma0) F="--xla_backend_extra_options=nvptx-fma-level=0";;
    nofusion) F="--xla_disable_hlo_passes=priority-fusion,multi_output_fusion,fusion-merger,sibling-fusion";;
  esac
  echo "== $v: $F"
  XLA_FLAGS="$F" timeout 200 python scripts/multidevice_check.py --only tpgrad,gen 2>&1 | grep -v Warning | grep -E "tp_grad |tp_train|gen_|FAIL|rror" | head -12
done
