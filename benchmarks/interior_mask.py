"""Interior KV blocks without the row mask: an A/B of ``INTERIOR_BLOCKS`` (``pallas_kernels/attention.py``).

Every block step masked its ``[64, 64]`` logits per element (``kidx >= lo`` and ``kidx < hi`` per
row, and a select), also in the blocks that lie inside the key interval of every row of the q block
(in causal prefill all blocks left of the diagonal; in decode every full block of the cache).
``INTERIOR_BLOCKS`` folds those blocks with ``"unmasked"`` (no select) or ``"column"`` (one select
on a per-key condition, no per-row compares) logits. The arithmetic is the same for a valid key
unless the compiler contracts the logit's last multiply with the max's subtraction into one FMA once
no select separates them, which would change bits: this script checks the bits on the GPU and
measures the gain. Soft-capped logits keep the column select in both forms (XLA:CPU's
contraction of ``cap * tanh(.) - m`` moved bits in interpret mode).

* variants: ``masked`` (sessions 1-21, the reference bits), ``unmasked``, ``column``;
* shapes: the attention issue's causal prefill at K = 4 (head dims 128 and 256, T 2048 and 8192,
  B 1 and 8) and head dim 64, two soft-capped (Gemma 2) prefills, and the decode shapes of
  ``block_step_selects.py`` plus a soft-capped one;
* tables and timing: ``benchmarks/attention_ab.py``.

Run from the repo root: python benchmarks/interior_mask.py [--iters N] [--quick]
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.attention_ab import main as ab_main
from detjax.ops._attention import attention

VARIANTS = [(form, dict(INTERIOR_BLOCKS=form)) for form in ("masked", "unmasked", "column")]
PREFILL = [(1, 2048, 128, 4), (8, 2048, 128, 4), (1, 8192, 128, 4), (8, 8192, 128, 4),
           (1, 2048, 256, 4), (8, 2048, 256, 4), (1, 8192, 256, 4), (8, 8192, 256, 4),
           (8, 2048, 64, 4),
           (8, 2048, 256, 4, dict(logits_soft_cap=50.0)),
           (1, 8192, 256, 4, dict(logits_soft_cap=50.0, sliding_window=4096))]
DECODE = [(8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128), (8, 8192, 4, 256),
          (1, 32768, 1, 128), (1, 8192, 4, 128), (8, 8192, 4, 256, dict(logits_soft_cap=50.0))]


def cpu_case():
    q, k, v = (jax.random.normal(kk, (2, 1100, n, 64), jnp.bfloat16)
               for kk, n in zip(jax.random.split(jax.random.key(12), 3), (4, 2, 2)))
    return "prefill T1100 window 300", lambda q, k, v: attention(q, k, v, sliding_window=300), (q, k, v)


if __name__ == "__main__":
    sys.exit(ab_main(sys.argv[1:], VARIANTS, PREFILL, DECODE, cpu_case()))
