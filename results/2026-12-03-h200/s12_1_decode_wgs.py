"""Session 12, run 1: Mosaic decode with one compute warpgroup per CTA (64 rows) against two
(128 rows, session 11's decode), 2 vs 3 K/V pipeline slots, and value columns split over E = 2 or 4
CTAs; same bits checked at every shape.
Also XLA's decode and detjax's default (Triton) decode for reference. Device time (CUPTI), median.

    PYTHONPATH=. python results/2026-12-03-h200/s12_1_decode_wgs.py
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import copy_bandwidth_gbs, device_ms
from detjax.ops._attention import decode_attention
from pallas_kernels import attention_mgpu as M

ITERS = 10
copy = copy_bandwidth_gbs(ITERS)
print(f"copy {copy:.0f} GB/s", flush=True)
key = jax.random.key(7)
# (B, cache, K, H, soft cap): gemma2_2b's decode shape (N 8, K 4, H 256, cap 50) at the caches of
# a 512-token prompt + 256 new tokens, and the attention issue's decode rows
shapes = [(8, 768, 4, 256, 50.0), (1, 768, 4, 256, 50.0), (64, 768, 4, 256, 50.0),
          (8, 8192, 4, 256, None), (1, 8192, 1, 128, None), (8, 8192, 4, 128, None),
          (64, 8192, 4, 128, None), (8, 32768, 4, 128, None), (64, 1024, 4, 128, None)]
for b, s, kh, h, cap in shapes:
    n = 8
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, n, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32) - jnp.arange(b, dtype=jnp.int32) % 3
    pos = lengths[:, None] - 1
    nbytes = kc.nbytes + vc.nbytes

    def xla(q, kc, vc, lengths):
        mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        return jax.nn.dot_product_attention(q, kc, vc, mask=mask, implementation="xla")

    row = [f"B{b} S{s} K{kh} H{h}"]
    t_x = device_ms(xla, q, kc, vc, lengths, iters=ITERS)
    t_t = device_ms(lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=cap),
                    q, kc, vc, lengths, iters=ITERS)
    row += [f"xla {t_x * 1e3:7.1f} us", f"triton {t_t * 1e3:7.1f} us ({100 * nbytes / t_t / 1e6 / copy:4.1f}%)"]
    ref = None
    configs = [(2, 2, 1), (1, 2, 1), (1, 3, 1)] + [(1, None, e) for e in (2, 4) if h // e >= 64]
    for wgs, steps, ve in configs:
        f = lambda q, kc, vc, p, l, wgs=wgs, steps=steps, ve=ve: M.forward(  # noqa: E731
            q, kc, vc, p, l, causal=True, sliding_window=None, soft_cap=cap, scale=h ** -0.5,
            layout="packed", compute_wgs=wgs, steps=steps, value_splits=ve)[0]
        try:
            out = np.asarray(jax.jit(f)(q, kc, vc, pos, lengths)).view(np.uint16)
            t = device_ms(f, q, kc, vc, pos, lengths, iters=ITERS)
        except Exception as e:  # e.g. 3 slots not fitting in shared memory
            row.append(f"wg{wgs}/s{steps}/E{ve}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        same = "" if ref is None else (" same" if np.array_equal(out, ref) else " DIFFERENT")
        ref = out if ref is None else ref
        row.append(f"wg{wgs}/s{steps}/E{ve} {t * 1e3:7.1f} us ({100 * nbytes / t / 1e6 / copy:4.1f}%){same}")
    print(" | ".join(row), flush=True)
sys.exit(0)
