"""Session 13, run 3 (run 2 with Lane lowering semantics, which lowers 16/32-wide N tiles, and more
tiles): a Mosaic GPU matmul for decode shapes (``pallas_kernels/matmul_mgpu.py``:
TMA + warp-specialized pipeline, one 64-row compute warpgroup, grid over N tiles, no split-K)
against XLA and the Triton kernel (detjax's default path) at the gemma2_2b projections, M = 8
(and 1, 64 for some). For every tile: device time of the kernel alone (rows pre-padded to 64),
with the row pad/slice, and whether its output has the Triton kernel's bits (bf16; f16 at one).

Run from the repo root: python results/2026-12-04-h200/s13_3_mgpu_matmul.py [budget_s]
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
from pallas_kernels import matmul_mgpu as mg

BUDGET_S = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
t0 = time.time()
shapes = {"down": (9216, 2304), "gateup": (2304, 18432), "up": (2304, 9216), "qkv": (2304, 4096),
          "o": (2048, 2304), "kv": (2304, 1024)}
cases = [(8, "down", jnp.bfloat16), (8, "up", jnp.bfloat16), (64, "down", jnp.bfloat16),
         (64, "up", jnp.bfloat16), (1, "down", jnp.bfloat16), (33, "o", jnp.float16),
         (7, "up", jnp.float16), (8, "kv", jnp.bfloat16)]
tiles = [(tn, tk, st) for tn, tk, st in itertools.product((16, 32, 64, 128), (64, 128, 256), (3, 4, 8))
         if st * (64 * tk + tk * tn) * 2 <= 200 * 1024 and not (st == 3 and tk < 256)]


def bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.int16))


summary = []
for M, name, dt in cases:
    if time.time() - t0 > BUDGET_S:
        print("budget reached before", M, name, flush=True)
        break
    k, n = shapes[name]
    a = jax.random.normal(jax.random.key(M + 7), (M, k), jnp.float32).astype(dt)
    ap = jnp.pad(a, ((0, -M % 64), (0, 0)))
    copies = max(1, min(8, int(np.ceil(150e6 / (k * n * 2)))))
    ws = jax.random.normal(jax.random.key(1), (copies, k, n), jnp.float32).astype(dt)
    gb = k * n * 2 / 1e6
    tx = device_ms(lambda a, ws: [jnp.dot(a, ws[i], preferred_element_type=jnp.float32).astype(dt)
                                  for i in range(copies)], a, ws) / copies
    tt = device_ms(lambda a, ws: [ops.matmul(a, ws[i]) for i in range(copies)], a, ws) / copies
    ref = bits(jax.jit(lambda a, w: ops.matmul(a, w))(a, ws[0]))
    print(f"{name:6s} M={M} K={k} N={n} {jnp.dtype(dt).name}: xla {tx*1e3:6.1f} us ({gb/tx:5.0f} GB/s)"
          f"  triton {tt*1e3:6.1f} us ({gb/tt:5.0f} GB/s, {tx/tt:4.2f}x)", flush=True)
    res = []
    for tn, tk, st in tiles:
        if time.time() - t0 > BUDGET_S:
            break
        if n % tn or k % tk:
            continue
        try:
            g = lambda a, ws, tn=tn, tk=tk, st=st: [mg.matmul(a, ws[i], tile_n=tn, tile_k=tk, steps=st)
                                                    for i in range(copies)]
            tp = device_ms(g, a, ws, iters=10) / copies
            same = bool((bits(jax.jit(g)(a, ws)[0]) == ref).all())
            t = tp
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"    {tn}x{tk}s{st} failed {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        res.append((t, tp, f"{tn}x{tk}s{st}", same))
    res.sort()
    for t, tp, cn, same in res[:6]:
        print(f"    mgpu {cn:10s} with row pad/slice {tp*1e3:6.1f} us ({gb/tp:5.0f} GB/s, {tx/tp:4.2f}x)"
              f"  same_bits_as_triton={same}", flush=True)
    print(f"    tiles run {len(res)}, same bits {sum(r[3] for r in res)}", flush=True)
    if res:
        summary.append((name, M, jnp.dtype(dt).name, tx, tt, res[0][0], res[0][2], all(r[3] for r in res)))
print("\n| shape | M | dtype | XLA us | Triton us (x) | best Mosaic us, incl. row pad/slice (x) | tile | all same bits |")
for name, M, d, tx, tt, tm, cn, same in summary:
    print(f"| {name} | {M} | {d} | {tx*1e3:.1f} | {tt*1e3:.1f} ({tx/tt:.2f}) | {tm*1e3:.1f} ({tx/tm:.2f}) | {cn} | {same} |")
print(f"elapsed {time.time() - t0:.0f} s", flush=True)
