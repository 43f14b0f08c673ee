"""Session 13, run 1: decode-shape matmul tile sweep (gemma2_2b projections at M = 8, and the down
projection at M = 1 and 64), XLA vs detjax's default tile vs more tiles than session 5 tried
(16-wide N tiles, 2 and 8 warps, deeper pipelines). Every tile's output is compared bitwise with
the default tile's. Prints one line per shape and the 6 fastest tiles.

Run from the repo root: python results/2026-12-04-h200/s13_1_decode_mm_sweep.py
"""
import itertools
import sys
import time

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import device_ms
from detjax import ops
from pallas_kernels import matmul as mm
from pallas_kernels.matmul import TileConfig

BUDGET_S = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
t_start = time.time()
cases = [(8, "down", 9216, 2304), (8, "gateup", 2304, 18432), (8, "up", 2304, 9216),
         (8, "kv", 2304, 1024), (8, "qkv", 2304, 4096), (1, "down", 9216, 2304),
         (64, "down", 9216, 2304), (64, "gateup", 2304, 18432)]


def cfgs_for(m):
    bm = 16 if m <= 16 else 64
    out = {}
    for bn, bk, w, s in itertools.product((16, 32, 64), (256, 512), (2, 4, 8), (4, 8)):
        if bm == 64 and w == 2:
            continue
        out[f"{bm}x{bn}x{bk}w{w}s{s}"] = TileConfig(bm, bn, bk, w, s)
    return out


def bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.int16))


for M, name, k, n in cases:
    if time.time() - t_start > BUDGET_S:
        print("budget reached, stopping before", name, M, flush=True)
        break
    a = jax.random.normal(jax.random.key(M), (M, k), jnp.bfloat16)
    copies = max(1, min(8, int(np.ceil(150e6 / (k * n * 2)))))
    ws = jax.random.normal(jax.random.key(1), (copies, k, n), jnp.bfloat16)
    tx = device_ms(lambda a, ws: [jnp.dot(a, ws[i], preferred_element_type=jnp.float32)
                                  .astype(jnp.bfloat16) for i in range(copies)], a, ws) / copies
    td = device_ms(lambda a, ws: [ops.matmul(a, ws[i]) for i in range(copies)], a, ws) / copies
    ref = bits(jax.jit(lambda a, ws: ops.matmul(a, ws[0]))(a, ws))
    gb = (k * n * 2) / 1e6
    print(f"{name:7s} M={M} K={k} N={n}: xla {tx*1e3:7.1f} us ({gb/tx:6.0f} GB/s)  detjax default "
          f"{td*1e3:7.1f} us ({gb/td:6.0f} GB/s) ratio {tx/td:4.2f}  default={mm.gpu_config_for(M, n, k)}",
          flush=True)
    res, nsame, nfail = [], 0, 0
    for cn, c in cfgs_for(M).items():
        if time.time() - t_start > BUDGET_S:
            break
        c = mm.fit_shared_memory(c, 2)
        if (-(-k // 64) * 64) % c.block_k:
            continue
        try:
            f = lambda a, ws, c=c: [mm.matmul_kernel_call(a[None], ws[i][None], config=c)
                                    for i in range(copies)]
            t = device_ms(f, a, ws, iters=10) / copies
            same = bool((bits(jax.jit(f)(a, ws)[0][0]) == ref).all())
        except Exception as e:  # noqa: BLE001 - a tile Triton refuses: report and go on
            print("   ", cn, "failed", type(e).__name__, str(e)[:100], flush=True)
            nfail += 1
            continue
        nsame += same
        res.append((t, cn, same))
    res.sort()
    for t, cn, same in res[:6]:
        print(f"    {cn:18s} {t*1e3:7.1f} us ({gb/t:6.0f} GB/s) ratio {tx/t:4.2f} same_bits={same}",
              flush=True)
    print(f"    tiles run {len(res)}, same bits as default {nsame}, failed {nfail}", flush=True)
print(f"elapsed {time.time() - t_start:.0f} s", flush=True)
