"""M=8192 gemma2_2b projections: tile configurations (all give the same bits) vs XLA."""
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from benchmarks.bench_kernels import device_ms
from pallas_kernels import matmul as mm
T = mm.TileConfig
C = {"large_wide(now)": T(128, 256, 64, 8, 3), "large": T(128, 128, 64, 8, 3), "large_deep": T(128, 128, 64, 4, 4),
     "128x256x64 8w4s": T(128, 256, 64, 8, 4), "256x128x64 8w3s": T(256, 128, 64, 8, 3),
     "128x128x128 8w3s": T(128, 128, 128, 8, 3), "128x256x128 8w2s": T(128, 256, 128, 8, 2),
     "64x256x64 4w4s": T(64, 256, 64, 4, 4)}
M = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
SH = [("unembed", M, 2304, 256000, True), ("down", M, 9216, 2304, False), ("up", M, 2304, 9216, False)]
key = jax.random.key(3)
for name, m, k, n, tb in SH:
    ka, kb = jax.random.split(jax.random.fold_in(key, n))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    w = jax.random.normal(kb, (n, k) if tb else (k, n), jnp.bfloat16)
    dims = (((1,), (1,)), ((), ())) if tb else (((1,), (0,)), ((), ()))
    t_x = device_ms(lambda a, w: jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32).astype(jnp.bfloat16), a, w, iters=10)
    print(f"{name} {m}x{k}x{n}: XLA {t_x:.3f} ms ({2*m*k*n/t_x/1e9:.0f} TFLOP/s)", flush=True)
    ref = None
    for c, cfg in C.items():
        try:
            f = lambda a, w, cfg=cfg: mm.matmul_kernel_call(a[None], w[None], transpose_b=tb, config=cfg)
            o = np.asarray(f(a, w)).view(np.uint16)
            ref = o if ref is None else ref
            same = np.array_equal(o, ref)
            t = device_ms(f, a, w, iters=10)
            auto = mm.gpu_config_for(m, n, k)
            print(f"   {c:18s} bits_same={same} {t:.3f} ms ratio {t_x/t:5.2f} {2*m*k*n/t/1e9:4.0f} TFLOP/s", flush=True)
        except Exception as e:
            print(f"   {c:18s} FAILED {type(e).__name__}: {str(e)[:100]}", flush=True)
    f = lambda a, w: mm.matmul_kernel_call(a[None], w[None], transpose_b=tb)
    t = device_ms(f, a, w, iters=10)
    print(f"   {'auto (+split)':18s} {t:.3f} ms ratio {t_x/t:5.2f}  cfg {mm.gpu_config_for(m, n, k)} split {mm.gpu_split_rows(1, m, n, mm.gpu_config_for(m, n, k))}", flush=True)
