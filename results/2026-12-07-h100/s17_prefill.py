"""Session 17, runs 2 and 3 (the same warm H100): the prefill shapes of the attention issue that
run 1's benchmark did not reach, cuDNN against the default (Triton) kernel and the opt-in Mosaic
GPU kernel in one process (CUPTI device time, median; bf16, N = 8, causal).

Run from the repo root: python results/2026-12-07-h100/s17_prefill.py [2|3]
(2: the four B8 T8192 shapes and B1 T8192 H256 K4; 3: B1 T8192 H256 K1, with XLA too).
As run, the same code was passed inline with ``python3 -c``.
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.bench_kernels import device_ms
from detjax.experimental import mosaic_attention
from detjax.ops._attention import attention

run = sys.argv[1] if len(sys.argv) > 1 else "2"
shapes = ([(1, 8192, 256, 4), (8, 8192, 128, 1), (8, 8192, 128, 4), (8, 8192, 256, 1), (8, 8192, 256, 4)]
          if run == "2" else [(1, 8192, 256, 1)])
key = jax.random.key(3)
for b, t, h, kh in shapes:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
    q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
    cu = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                   q, k, v, iters=10)
    xl = ""
    if run == "3":
        xla_ms = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
                           q, k, v, iters=5)
        xl = f"xla {xla_ms:.4f} "
    mo = device_ms(lambda q, k, v: mosaic_attention(q, k, v), q, k, v, iters=10)
    tr = device_ms(lambda q, k, v: attention(q, k, v, causal=True), q, k, v, iters=5)
    print(f"prefill B{b} T{t} H{h} N8 K{kh}: {xl}cudnn {cu:.4f} ms  triton {tr:.4f} ({cu/tr:.2f}x)  "
          f"mosaic {mo:.4f} ({cu/mo:.2f}x)", flush=True)
