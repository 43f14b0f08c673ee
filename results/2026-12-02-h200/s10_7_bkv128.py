"""s10-7: the s10-6 probe with 128-key blocks (head dim 128), same run as cuDNN; batch invariance."""
import sys, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "results/2026-12-02-h200")
import s10_6_mgpu_intervals as P
from benchmarks.bench_kernels import device_ms
key = jax.random.key(0)
for b, t, h, kh in [(1, 2048, 128, 1), (8, 2048, 128, 4), (1, 8192, 128, 1), (8, 8192, 128, 4)]:
    ks = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
    q = jax.random.normal(ks[0], (b, t, 8, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kh, h), jnp.bfloat16)
    cud = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=10)
    p64 = device_ms(lambda q, k, v: P.detjax_semantics_attention(q, k, v), q, k, v, iters=10)
    p128 = device_ms(lambda q, k, v: P.detjax_semantics_attention(q, k, v, block_kv=128), q, k, v, iters=10)
    print(f"prefill B{b} T{t} H{h} K{kh}: cudnn {cud:.3f}  probe bkv64 {p64:.3f} ({cud/p64:.2f})  bkv128 {p128:.3f} ({cud/p128:.2f})", flush=True)
f = jax.jit(lambda q, k, v: P.detjax_semantics_attention(q, k, v, block_kv=128))
full = np.asarray(f(q, k, v)).view(np.uint16); one = np.asarray(f(q[5:6], k[5:6], v[5:6])).view(np.uint16)
print("bkv128 batch invariance (row 5 of 8 == alone):", np.array_equal(full[5], one[0]))
