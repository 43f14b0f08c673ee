#!/usr/bin/env bash
# Session 23, run 1, from the repo root, at commit 88b47a1 (key splits then the Mosaic kernel's default;
# since then opt-in, attention_mgpu.SPLITS): the Mosaic GPU attention with key splits (first GPU run):
# benchmarks/mosaic_splits.py --quick (decode = prefill across split boundaries, 4 prefill and 3 decode
# shapes against cuDNN / XLA and the kernel without splits), then the Mosaic attention GPU tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
F="^WARNING\|^I0000\|^W0000\|^E0000"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/s23_1_device.txt"
timeout $((330 - SECONDS)) python3 benchmarks/mosaic_splits.py --quick 2>&1 | grep --line-buffered -v "$F" \
  > "$OUT/s23_1_bench.txt"
cat "$OUT/s23_1_bench.txt" | tail -40
timeout $((560 - SECONDS)) python3 -m pytest -q -x tests/test_mosaic_attention.py -k gpu -p no:cacheprovider 2>&1 \
  | grep --line-buffered -v "$F" > "$OUT/s23_1_pytest.log"
tail -30 "$OUT/s23_1_pytest.log"
