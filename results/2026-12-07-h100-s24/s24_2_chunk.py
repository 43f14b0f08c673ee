"""Session 24, run 2 (A/B): where the split prefill keeps its running total. In the float32 global
scratch, merged ``attention_mgpu.MERGE_CHUNK`` columns at a time (64 = 32 registers a thread, or
32), or in registers (``REGISTER_TOTAL_MAX_HV`` raised to the value tile's width), against the
kernel without splits and cuDNN, same process, CUPTI median of 10. Run with
MOSAIC_GPU_DUMP_PTXAS=1 (s24_2_run.sh) for ptxas' spill report of each compiled kernel: s24-1
showed 184 bytes of spills at head dim 256 with chunk 64, none at 128. Both are speed choices,
not bit choices (the merge is elementwise; a float32 store and load are exact): the script
checks the bits too."""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import bits, device_ms
from benchmarks.mosaic_splits import mosaic
from pallas_kernels import attention as _k
from pallas_kernels import attention_mgpu as M

VARIANTS = {"chunk 64": (64, 0), "chunk 32": (32, 0), "registers": (64, 256)}  # (chunk, max hv)
for b, t, h, kh, names in [(8, 8192, 256, 4, ("chunk 64", "chunk 32")), (1, 2048, 256, 1, ("chunk 64", "chunk 32")),
                           (8, 8192, 128, 4, ("chunk 64", "chunk 32", "registers")),
                           (8, 8192, 64, 4, ("registers", "chunk 64"))]:
    kq, kk, kv = jax.random.split(jax.random.key(b * t + h + kh), 3)
    q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
    args = (q, k, v, _k.default_q_positions(b, t, t), jnp.full((b,), t, jnp.int32))
    t_c = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn"), q, k, v, iters=10)
    print(f"=== B{b} T{t} H{h} K{kh}: no splits", flush=True)
    t_n = device_ms(lambda *a: mosaic(*a, splits=False), *args, iters=10)
    line = f"RESULT B{b} T{t} H{h} K{kh}: cuDNN {t_c:.4f} ms; no splits {t_n:.4f} ({t_c / t_n:.2f}x)"
    ref = None
    for name in names:
        M.MERGE_CHUNK, M.REGISTER_TOTAL_MAX_HV = VARIANTS[name]
        print(f"=== B{b} T{t} H{h} K{kh}: splits, {name}", flush=True)
        ms = device_ms(lambda *a: mosaic(*a), *args, iters=10)
        got = bits(jax.jit(lambda *a: mosaic(*a))(*args))
        ref = got if ref is None else ref
        line += f"; {name} {ms:.4f} ({t_c / ms:.2f}x, bits {'same' if np.array_equal(got, ref) else 'DIFFER'})"
    M.MERGE_CHUNK, M.REGISTER_TOTAL_MAX_HV = 64, 64
    print(line, flush=True)
    del q, k, v, args
