"""The selects of the attention block step: an A/B of ``_block_step`` with and without them.

``_block_step`` (``pallas_kernels/attention.py``) folds one 64-key block into the softmax state of
64 rows. It had two per-element selects that keep a row's state bitwise unchanged when the block
holds no valid key for it: ``acc = where(any_valid, acc_new, acc)`` over the ``[64, Hp]`` float32
accumulator, which keeps the old and the new accumulator alive together (at head dim 256 and
4 warps, 128 + 128 registers per thread), and ``p = where(valid, exp(s - m), 0)`` over the
``[64, 64]`` probabilities, although ``s`` is already ``-inf`` outside the interval. Neither changes
a finite result (``_block_step``'s docstring says why; CPU test
``test_block_step_selects_do_not_change_bits``, which runs compiled on a GPU too). This script
measures what they cost and checks the bits on the GPU at the benchmark shapes:

* variants: ``selects`` (both; the form of sessions 1-19), ``no acc select``, ``no selects`` (the
  default since run s20-1: ``BLOCK_STEP_SELECT_ACC`` / ``_P``);
* causal bf16 prefill through ``detjax.ops.attention`` (the product path: split-parallel at head
  dims 128/256, the one-kernel prefill at 64), N = 8, T = S, against cuDNN;
* one-token decode through ``decode_attention`` (full caches), against XLA, with the % of the
  copy bandwidth for the K/V bytes;
* bits: every variant's output against the ``selects`` output of the same inputs.

The driver (timing, bits, tables) is ``benchmarks/attention_ab.py``. GPU only for the timings; on
CPU (interpret mode) it runs the bit check at one small shape.

Run from the repo root: python benchmarks/block_step_selects.py [--iters N] [--quick]
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.attention_ab import main as ab_main
from detjax.ops._attention import attention

VARIANTS = [("selects", dict(BLOCK_STEP_SELECT_ACC=True, BLOCK_STEP_SELECT_P=True)),
            ("no acc select", dict(BLOCK_STEP_SELECT_ACC=False, BLOCK_STEP_SELECT_P=True)),
            ("no selects", dict(BLOCK_STEP_SELECT_ACC=False, BLOCK_STEP_SELECT_P=False))]
PREFILL = [(1, 2048, 128, 4), (8, 2048, 128, 4), (1, 8192, 128, 4), (8, 8192, 128, 4),
           (1, 2048, 256, 4), (8, 2048, 256, 4), (1, 8192, 256, 4), (8, 8192, 256, 4),
           (8, 2048, 64, 4)]
DECODE = [(8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128), (8, 8192, 4, 256),
          (1, 32768, 1, 128)]


def cpu_case():
    q, k, v = (jax.random.normal(kk, (2, 1100, n, 64), jnp.bfloat16)
               for kk, n in zip(jax.random.split(jax.random.key(11), 3), (4, 2, 2)))
    return "prefill T1100 window 300", lambda q, k, v: attention(q, k, v, sliding_window=300), (q, k, v)


if __name__ == "__main__":
    sys.exit(ab_main(sys.argv[1:], VARIANTS, PREFILL, DECODE, cpu_case()))
