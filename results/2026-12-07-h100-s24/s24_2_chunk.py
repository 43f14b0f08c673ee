"""Session 24, run 2 (A/B): the split prefill's merge chunk (``attention_mgpu.MERGE_CHUNK``, columns
of the float32 running total loaded / merged / stored at a time; 64 = 32 registers a thread) at 64
and 32, against the kernel without splits and cuDNN, same process, CUPTI median of 10. Run with
MOSAIC_GPU_DUMP_PTXAS=1 (s24_2_run.sh) for ptxas' spill report of each compiled kernel: s24-1
showed 184 bytes of spills at head dim 256 with chunk 64, none at 128. Chunk width is a speed
choice, not a bit choice (the merge is elementwise): the script checks the bits too."""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import bits, device_ms
from benchmarks.mosaic_splits import mosaic
from pallas_kernels import attention as _k
from pallas_kernels import attention_mgpu as M

for b, t, h, kh in [(8, 8192, 256, 4), (1, 2048, 256, 1), (8, 8192, 128, 4)]:
    kq, kk, kv = jax.random.split(jax.random.key(b * t + h + kh), 3)
    q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
    args = (q, k, v, _k.default_q_positions(b, t, t), jnp.full((b,), t, jnp.int32))
    t_c = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="cudnn"), q, k, v, iters=10)
    print(f"=== B{b} T{t} H{h} K{kh}: no splits", flush=True)
    t_n = device_ms(lambda *a: mosaic(*a, splits=False), *args, iters=10)
    res = {}
    for chunk in (64, 32):
        M.MERGE_CHUNK = chunk
        print(f"=== B{b} T{t} H{h} K{kh}: splits, MERGE_CHUNK {chunk}", flush=True)
        res[chunk] = (device_ms(lambda *a: mosaic(*a), *args, iters=10), bits(jax.jit(lambda *a: mosaic(*a))(*args)))
    M.MERGE_CHUNK = 64
    same = np.array_equal(res[64][1], res[32][1])
    print(f"RESULT B{b} T{t} H{h} K{kh}: cuDNN {t_c:.4f} ms; no splits {t_n:.4f} ({t_c / t_n:.2f}x); "
          f"splits chunk 64 {res[64][0]:.4f} ({t_c / res[64][0]:.2f}x), chunk 32 {res[32][0]:.4f} "
          f"({t_c / res[32][0]:.2f}x); chunk 32 bits {'same' if same else 'DIFFER'}", flush=True)
    del q, k, v, args
