"""float32 matmul (precision highest: FMA dots): tile configurations (same bits) vs XLA HIGHEST."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from benchmarks.bench_kernels import device_ms
from pallas_kernels import matmul as mm
T = mm.TileConfig
C = {"auto": None, "large 128x128x64 8w3s": T(128, 128, 64, 8, 3), "large_deep 128x128x64 4w4s": T(128, 128, 64, 4, 4),
     "64x128x32 4w3s": T(64, 128, 32, 4, 3), "64x64x32 4w3s": T(64, 64, 32, 4, 3),
     "128x64x32 4w3s": T(128, 64, 32, 4, 3), "128x128x32 8w3s": T(128, 128, 32, 8, 3), "64x256x32 8w3s": T(64, 256, 32, 8, 3)}
# (name, batch, m, k, n): the XLA model's p @ v at B8 T512 (batch b*k=32, rows g*t=1024, S=512, H=256), a square
SH = [("pv B8T512", 32, 1024, 512, 256), ("square 4096", 1, 4096, 4096, 4096), ("upcast up B8T512", 1, 4096, 2304, 9216)]
key = jax.random.key(5)
for name, bt, m, k, n in SH:
    ka, kb = jax.random.split(jax.random.fold_in(key, n + m))
    a = jax.random.normal(ka, (bt, m, k), jnp.float32)
    w = jax.random.normal(kb, (bt, k, n), jnp.float32)
    fx = lambda a, w: jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST)
    t_x = device_ms(fx, a, w, iters=10)
    fl = 2 * bt * m * k * n
    print(f"{name} {bt}x{m}x{k}x{n}: XLA HIGHEST {t_x:.3f} ms ({fl/t_x/1e9:.1f} TFLOP/s)", flush=True)
    ref = None
    for c, cfg in C.items():
        t0 = time.time()
        try:
            f = lambda a, w, cfg=cfg: mm.matmul_kernel_call(a, w, config=cfg)
            o = np.asarray(f(a, w)).view(np.uint32)
            ref = o if ref is None else ref
            t = device_ms(f, a, w, iters=10)
            print(f"   {c:28s} bits_same={np.array_equal(o, ref)} {t:.3f} ms  XLA/detjax {t_x/t:5.2f} {fl/t/1e9:5.1f} TFLOP/s (compile+run {time.time()-t0:.0f}s)", flush=True)
        except Exception as e:
            print(f"   {c:28s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
    print(f"   auto cfg: {mm.fit_shared_memory(mm.gpu_config_for(m, n, k), 4)}", flush=True)
