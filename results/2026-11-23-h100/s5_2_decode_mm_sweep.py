"""Decode-shape matmul sweep (M=8, gemma2_2b projections): XLA vs detjax default vs tile configs."""
import sys, itertools
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from benchmarks.bench_kernels import device_ms
from detjax import ops
from pallas_kernels import matmul as mm
from pallas_kernels.matmul import TileConfig

shapes = [("q", 2304, 2048), ("kv", 2304, 1024), ("qkv", 2304, 4096), ("o", 2048, 2304),
          ("up", 2304, 9216), ("gateup", 2304, 18432), ("down", 9216, 2304)]
cfgs = {}
for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 5)):
    cfgs[f"{bn}x{bk}w{w}s{s}"] = TileConfig(16, bn, bk, w, s)
M = int(sys.argv[1]) if len(sys.argv) > 1 else 8
key = jax.random.key(0)
for name, k, n in shapes:
    a = jax.random.normal(key, (M, k), jnp.bfloat16)
    copies = max(1, min(8, int(np.ceil(150e6 / (k * n * 2)))))
    ws = jax.random.normal(jax.random.key(1), (copies, k, n), jnp.bfloat16)
    tx = device_ms(lambda a, ws: [jnp.dot(a, ws[i], preferred_element_type=jnp.float32).astype(jnp.bfloat16) for i in range(copies)], a, ws) / copies
    td = device_ms(lambda a, ws: [ops.matmul(a, ws[i]) for i in range(copies)], a, ws) / copies
    gb = (k * n * 2) / 1e6
    print(f"{name:7s} M={M} K={k} N={n}: xla {tx*1e3:7.1f} us ({gb/tx:6.0f} GB/s)  detjax {td*1e3:7.1f} us ({gb/td:6.0f} GB/s) ratio {tx/td:4.2f}  default={mm.gpu_config_for(M, n, k)}", flush=True)
    res = []
    ref = None
    for cn, c in cfgs.items():
        c = mm.fit_shared_memory(c, 2)
        if (round(k / 64 + .49) * 64) % c.block_k: continue
        try:
            f = lambda a, ws, c=c: [mm.matmul_kernel_call(a[None], ws[i][None], config=c) for i in range(copies)]
            t = device_ms(f, a, ws) / copies
            out = jax.jit(f)(a, ws)[0]
            same = ref is None or bool((jax.lax.bitcast_convert_type(out, jnp.int16) == jax.lax.bitcast_convert_type(ref, jnp.int16)).all())
            ref = out if ref is None else ref
        except Exception as e:
            print("   ", cn, "failed", type(e).__name__); continue
        res.append((t, cn, same))
    res.sort()
    for t, cn, same in res[:6]:
        print(f"    {cn:14s} {t*1e3:7.1f} us ({gb/t:6.0f} GB/s) ratio {tx/t:4.2f} same_bits={same}")
    print("    all same bits:", all(s for _, _, s in res), flush=True)
