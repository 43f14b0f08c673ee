"""Session 6: decode-kernel (num_warps, num_stages) candidates with the 64-row tile: speed, and bits
equal to the current decode config (which equals prefill, GPU suite)."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
import pallas_kernels.attention as A
from benchmarks.bench_kernels import device_ms
from detjax.ops._attention import decode_attention

T0 = time.time()
BASE = A.gpu_config
CANDS = {"cur": {}, "c1": {256: (8, 2), 128: (4, 3)}, "c2": {256: (4, 2), 128: (8, 2)},
         "c3": {256: (8, 1), 128: (8, 3)}}


def setc(name):
    jax.clear_caches()
    over = CANDS[name]
    A.gpu_config = lambda h, kernel="prefill": (over.get(A.padded_head_dim(h), BASE(h)) if kernel == "decode" else BASE(h))


def bits(x):
    x = np.asarray(x); return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def outs(dt, H):
    B, S, N, K = 6, 2500, 8, 4
    ks = jax.random.split(jax.random.key(H), 3)
    q = jax.random.normal(ks[0], (B, 3, N, H), dt)
    k = jax.random.normal(ks[1], (B, S, K, H), dt)
    v = jax.random.normal(ks[2], (B, S, K, H), dt)
    ln = jnp.array([2500, 1100, 65, 1024, 1025, 7], jnp.int32)
    past = jnp.arange(S)[None, :, None, None] >= ln[:, None, None, None]
    kn, vn = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)
    return [bits(decode_attention(q[:, :1], k, v, ln, logits_soft_cap=50.0)),
            bits(decode_attention(q[:, :1], kn, vn, ln)),
            bits(decode_attention(q[:, :1], k, v, ln, sliding_window=700)),
            bits(decode_attention(q, k, v, ln))]


PERF = [("gemma2 B8 S640 L576 H256 K4 cap50", 8, 640, 576, 256, 4, 50.0),
        ("B64 S1024 L768 H256 K4 cap50", 64, 1024, 768, 256, 4, 50.0),
        ("B8 S8192 H256 K4", 8, 8192, 8192, 256, 4, None),
        ("B8 S8192 H128 K4", 8, 8192, 8192, 128, 4, None),
        ("B64 S8192 H128 K4", 64, 8192, 8192, 128, 4, None)]

names = sys.argv[1].split(",")
for name in names:
    setc(name)
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    for pn, b, s, L, H, K, cap in PERF:
        q = jax.random.normal(kq, (b, 1, 8, H), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, K, H), jnp.bfloat16)
        ln = jnp.full((b,), L, jnp.int32)
        ms = device_ms(lambda q, k, v, l: decode_attention(q, k, v, l, logits_soft_cap=cap), q, k, v, ln)
        print(f"perf {name:4s} {pn:36s} {ms * 1e3:8.1f} us {2 * b * L * K * H * 2 / ms / 1e6:6.0f} GB/s", flush=True)
REF = {}
for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
    for H in (256, 128):
        for name in names:
            setc(name)
            o = outs(dt, H)
            if name == "cur":
                REF[(dt, H)] = o; continue
            eq = [bool(np.array_equal(a, b)) for a, b in zip(o, REF[(dt, H)])]
            print(f"bits {name} {jnp.dtype(dt).name} H{H}: {eq}  [{time.time() - T0:.0f}s]", flush=True)
print("done", flush=True)
