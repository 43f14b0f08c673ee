"""Session 23, run 2 (second part): ptxas' register and spill report (MOSAIC_GPU_DUMP_PTXAS=1, set
by s23_2_run.sh) for the Mosaic attention's prefill with and without the key splits at
B8 T8192 head dims 128 / 256 and the split decode's two kernels: is the 17-43% the splits cost
prefill in s23-1 spilling (acc + a merge chunk under the 232-register cap)?"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.mosaic_splits import mosaic

for h in (128, 256):
    for splits in (False, True):
        b, t = 8, 8192
        q = jax.ShapeDtypeStruct((b, t, 8, h), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((b, t, 4, h), jnp.bfloat16)
        i2, i1 = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
        print(f"=== prefill B{b} T{t} H{h} splits={splits} ===", flush=True)
        jax.jit(lambda *a, s=splits: mosaic(*a, splits=s)).lower(q, kv, kv, i2, i1).compile()
    print(f"=== decode B8 cache 8192 H{h} splits=True (split kernel + merge kernel) ===", flush=True)
    q = jax.ShapeDtypeStruct((8, 1, 8, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((8, 8192, 4, h), jnp.bfloat16)
    jax.jit(lambda *a: mosaic(*a, layout="packed")).lower(
        q, kv, kv, jax.ShapeDtypeStruct((8, 1), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32)).compile()
