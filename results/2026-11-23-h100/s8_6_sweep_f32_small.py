"""float32 'highest' at small M (decode with the f32 upcast): tiles (same bits) vs XLA HIGHEST; GB/s of the weight."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from benchmarks.bench_kernels import device_ms
from pallas_kernels import matmul as mm
T = mm.TileConfig
C = {"fma_small 16x64x32 4w3s": T(16, 64, 32, 4, 3), "16x32x32 2w3s": T(16, 32, 32, 2, 3), "16x128x32 4w3s": T(16, 128, 32, 4, 3),
     "16x64x64 4w3s": T(16, 64, 64, 4, 3), "16x32x64 4w4s": T(16, 32, 64, 4, 4), "old small_deep 16x32x256 4w(fit)": mm.fit_shared_memory(mm.GPU_CONFIGS["small_deep"], 4),
     "old small_wide 16x64x128 4w(fit)": mm.fit_shared_memory(mm.GPU_CONFIGS["small_wide"], 4), "fma 64x128x32": mm.GPU_CONFIGS["fma"]}
SH = [("up", 8, 2304, 9216), ("down", 8, 9216, 2304), ("up M1", 1, 2304, 9216), ("up M16", 16, 2304, 9216), ("qkv M64", 64, 2304, 4096)]
key = jax.random.key(6)
for name, m, k, n in SH:
    ka, kb = jax.random.split(jax.random.fold_in(key, n + m))
    a = jax.random.normal(ka, (1, m, k), jnp.float32)
    w = jax.random.normal(kb, (1, k, n), jnp.float32)
    t_x = device_ms(lambda a, w: jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST), a, w, iters=20)
    gb = k * n * 4 / 1e6
    print(f"{name} M={m} K={k} N={n}: XLA HIGHEST {t_x*1e3:.1f} us ({gb/t_x:.0f} GB/s)", flush=True)
    ref = None
    for c, cfg in C.items():
        try:
            f = lambda a, w, cfg=cfg: mm.matmul_kernel_call(a, w, config=cfg)
            o = np.asarray(f(a, w)).view(np.uint32)
            ref = o if ref is None else ref
            t = device_ms(f, a, w, iters=20)
            print(f"   {c:34s} bits_same={np.array_equal(o, ref)} {t*1e3:8.1f} us  XLA/detjax {t_x/t:5.2f} {gb/t:5.0f} GB/s", flush=True)
        except Exception as e:
            print(f"   {c:34s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
