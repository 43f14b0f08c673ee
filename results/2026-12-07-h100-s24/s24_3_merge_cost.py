"""Session 24, run 3 (prepared for the next session, NOT YET RUN): what a merge costs the split
prefill at head dim 256 (the total in the global float32 scratch). Causal bf16, B1, N8, K1, T = S
in {1024, 2048, 4096, 8192}: the last row block's CTAs fold T / 1024 splits and merge
T / 1024 - 1 times, so (splits - no splits) against the merge count gives the cost of a merge on
the kernel's critical path. If T = 1024 (no merge) already costs, the split loop's structure
does, not the merges. Head dim 128 (the total in registers) alongside. CUPTI median of 10."""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.bench_kernels import device_ms
from benchmarks.mosaic_splits import mosaic
from pallas_kernels import attention as _k

for h in (256, 128):
    for t in (1024, 2048, 4096, 8192):
        kq, kk, kv = jax.random.split(jax.random.key(t + h), 3)
        q = jax.random.normal(kq, (1, t, 8, h), jnp.bfloat16)
        k = jax.random.normal(kk, (1, t, 1, h), jnp.bfloat16)
        v = jax.random.normal(kv, (1, t, 1, h), jnp.bfloat16)
        args = (q, k, v, _k.default_q_positions(1, t, t), jnp.full((1,), t, jnp.int32))
        t_n = device_ms(lambda *a: mosaic(*a, splits=False), *args, iters=10)
        t_s = device_ms(lambda *a: mosaic(*a), *args, iters=10)
        merges = t // 1024 - 1
        per = f"{(t_s - t_n) * 1e3 / merges:.1f} us a merge" if merges else "no merge"
        print(f"H{h} T{t}: no splits {t_n * 1e3:.1f} us, splits {t_s * 1e3:.1f} us "
              f"(+{(t_s / t_n - 1) * 100:.0f}%, {merges} merges on the last CTA: {per})", flush=True)
