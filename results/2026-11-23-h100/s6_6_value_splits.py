"""Session 6: decode with value-column splits (E programs per (row block, split)): bits vs prefill
for bf16/f16 at head dims 256/128, and speed per E."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
import pallas_kernels.attention as A
from benchmarks.bench_kernels import device_ms
from detjax.ops._attention import attention, decode_attention

T0 = time.time()
RULE = A.decode_value_splits
CFG = A.gpu_config


def force(e, cfg=None):
    jax.clear_caches()
    A.decode_value_splits = RULE if e is None else (lambda hp, p, dt, be="gpu", e=e: e)
    A.gpu_config = CFG if cfg is None else (lambda h, kernel="prefill", dtype=None: cfg if kernel == "decode" else CFG(h))


def bits(x):
    x = np.asarray(x); return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


print("== bits: decode (E forced) vs prefill; sequences equal / total ==", flush=True)
for dt in (jnp.bfloat16, jnp.float16):
    for H in (256, 128):
        B, S, N, K = 2, 1100, 8, 4
        ks = jax.random.split(jax.random.key(H + 11), 3)
        q = jax.random.normal(ks[0], (B, S, N, H), dt)
        k = jax.random.normal(ks[1], (B, S, K, H), dt)
        v = jax.random.normal(ks[2], (B, S, K, H), dt)
        force(None)
        pre_cap = np.asarray(attention(q, k, v, logits_soft_cap=50.0))
        pre_win = np.asarray(attention(q, k, v, sliding_window=300))
        Ls = [2, 63, 64, 65, 129, 500, 1023, 1024, 1025, 1100, 777, 3]
        bs = [i % 2 for i in range(len(Ls))]
        maxlen = 1152
        past = jnp.arange(maxlen)[None, :, None, None] >= jnp.array(Ls)[:, None, None, None]
        kc = jnp.stack([jnp.pad(k[b], ((0, maxlen - S), (0, 0), (0, 0))) for b in bs])
        vc = jnp.stack([jnp.pad(v[b], ((0, maxlen - S), (0, 0), (0, 0))) for b in bs])
        kn, vn = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.inf, vc)
        qd = jnp.stack([q[b, L - 2:L] for b, L in zip(bs, Ls)])
        w_cap = np.stack([pre_cap[b, L - 2:L] for b, L in zip(bs, Ls)])
        w_win = np.stack([pre_win[b, L - 2:L] for b, L in zip(bs, Ls)])
        for e in ((1, 2, 4) if H == 256 else (1, 2)) + (None,):
            force(e)
            d1 = np.asarray(decode_attention(qd, kn, vn, jnp.array(Ls, jnp.int32), logits_soft_cap=50.0))
            d2 = np.asarray(decode_attention(qd, kc, vc, jnp.array(Ls, jnp.int32), sliding_window=300))
            r = [bool(np.array_equal(bits(d1[i]), bits(w_cap[i])) and np.array_equal(bits(d2[i]), bits(w_win[i])))
                 for i in range(len(Ls))]
            print(f"bits {jnp.dtype(dt).name} H{H} E={e}: {sum(r)}/{len(r)}  [{time.time() - T0:.0f}s]", flush=True)

PERF = [("gemma2 B8 S640 L576 H256 K4 cap50", 8, 640, 576, 256, 4, 50.0),
        ("B1 S640 L576 H256 K4 cap50", 1, 640, 576, 256, 4, 50.0),
        ("B64 S1024 L768 H256 K4 cap50", 64, 1024, 768, 256, 4, 50.0),
        ("B8 S8192 H256 K4", 8, 8192, 8192, 256, 4, None),
        ("B8 S8192 H128 K4", 8, 8192, 8192, 128, 4, None),
        ("B1 S8192 H128 K1", 1, 8192, 8192, 128, 1, None)]
print("== perf ==", flush=True)
kq, kk, kv = jax.random.split(jax.random.key(1), 3)
for tag, e, cfg in (("rule", None, None), ("E1", 1, None), ("E2", 2, None), ("E4", 4, None), ("E4-w4s2", 4, (4, 2)),
                    ("E2-w8s2", 2, (8, 2))):
    force(e, cfg)
    for pn, b, s, L, H, K, cap in PERF:
        if e is not None and H // e < 64:
            continue
        q = jax.random.normal(kq, (b, 1, 8, H), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, K, H), jnp.bfloat16)
        ln = jnp.full((b,), L, jnp.int32)
        ms = device_ms(lambda q, k, v, l: decode_attention(q, k, v, l, logits_soft_cap=cap), q, k, v, ln)
        print(f"perf {tag:8s} {pn:36s} {ms * 1e3:8.1f} us {2 * b * L * K * H * 2 / ms / 1e6:6.0f} GB/s", flush=True)
print("done", flush=True)
