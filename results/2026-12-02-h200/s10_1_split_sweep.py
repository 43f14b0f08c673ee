"""s10-1: decode/prefill attention time for one ATTN_SPLIT_K (run from a repo copy whose
pallas_kernels/order.py sets it). Prints one line per shape; also checks decode = prefill bitwise."""
import sys, statistics
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import order
from detjax.ops._attention import attention, decode_attention
from benchmarks.bench_kernels import device_ms

tag = f"split{order.ATTN_SPLIT_K}"
import pallas_kernels; print(tag, pallas_kernels.__file__)
key = jax.random.key(7)
decode = [  # (B, S cache, L length, K, H, N, cap)
    (8, 768, 640, 4, 256, 8, 50.0), (1, 768, 640, 4, 256, 8, 50.0), (64, 1024, 768, 4, 256, 8, 50.0),
    (1, 8192, 8192, 1, 128, 8, None), (8, 8192, 8192, 4, 128, 8, None), (64, 8192, 8192, 4, 128, 8, None),
    (8, 32768, 32768, 4, 128, 8, None), (1, 32768, 32768, 1, 128, 8, None)]
for b, s, L, kh, h, n, cap in decode:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + h), 3)
    q = jax.random.normal(kq, (b, 1, n, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), L, jnp.int32)
    f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=cap)
    ms = device_ms(f, q, kc, vc, lengths, iters=30)
    used = 2 * b * L * kh * h * 2
    print(f"{tag} decode B{b} S{s} L{L} K{kh} H{h} cap{cap}: {ms*1e3:8.1f} us  {used/ms/1e6:7.0f} GB/s", flush=True)
# decode = prefill (bits) at one long shape
b, s, kh, h, n = 2, 3000, 2, 128, 8
kq, kk, kv = jax.random.split(jax.random.fold_in(key, 99), 3)
q = jax.random.normal(kq, (b, s, n, h), jnp.bfloat16)
k = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
v = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
full = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, causal=True))(q, k, v)).view(np.uint16)
ok = 0; ts = [1, 255, 256, 257, 1023, 1024, 1025, 2047, 2999]
for t in ts:
    lens = jnp.array([t + 1, t + 1], jnp.int32)
    d = decode_attention(q[:, t:t + 1], k, v, lens)
    ok += int(np.array_equal(np.asarray(d).view(np.uint16)[:, 0], full[:, t]))
print(f"{tag} decode=prefill bitwise at t in {ts}: {ok}/{len(ts)}", flush=True)
prefill = [(1, 8192, 128, 1), (8, 2048, 128, 4), (1, 2048, 256, 4)]
for b, t, h, kh in prefill:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
    q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
    ms = device_ms(lambda q, k, v: attention(q, k, v, causal=True), q, k, v, iters=10)
    print(f"{tag} prefill B{b} T{t} H{h} K{kh}: {ms:8.3f} ms", flush=True)
