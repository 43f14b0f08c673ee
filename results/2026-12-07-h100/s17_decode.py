"""Session 17, run 4 (the same warm H100): decode attention, one token x 8 query heads, full caches,
bf16: XLA (``jax.nn.dot_product_attention`` with a length mask) against the default (Triton) split
decode and the opt-in Mosaic GPU decode; CUPTI device time (median of 10) and % of the copy
bandwidth (3028 GB/s, run 0) for the K/V cache bytes.

Run from the repo root: python results/2026-12-07-h100/s17_decode.py
(as run, the same code was passed inline with ``python3 -c``).
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.bench_kernels import device_ms
from detjax.experimental import mosaic_decode_attention
from detjax.ops._attention import decode_attention

copy = 3028.0
key = jax.random.key(4)
for b, s, kh, h in [(1, 8192, 1, 128), (8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128),
                    (64, 1024, 4, 128), (8, 768, 4, 256), (8, 8192, 4, 256)]:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)

    def xla(q, kc, vc, lengths, s=s):
        m = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        return jax.nn.dot_product_attention(q, kc, vc, mask=m, implementation="xla")

    gb = (kc.nbytes + vc.nbytes) / 1e6
    tx = device_ms(xla, q, kc, vc, lengths, iters=10)
    tt = device_ms(lambda q, kc, vc, l: decode_attention(q, kc, vc, l), q, kc, vc, lengths, iters=10)
    tm = device_ms(lambda q, kc, vc, l: mosaic_decode_attention(q, kc, vc, l), q, kc, vc, lengths, iters=10)
    print(f"decode B{b} cache{s} K{kh} H{h}: xla {tx*1e3:.1f} us | triton {tt*1e3:.1f} us ({tx/tt:.2f}x, "
          f"{100*gb/tt/copy:.1f}% copy) | mosaic {tm*1e3:.1f} us ({tx/tm:.2f}x, {100*gb/tm/copy:.1f}% copy)",
          flush=True)
