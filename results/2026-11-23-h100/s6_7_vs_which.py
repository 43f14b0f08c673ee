import sys, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
import pallas_kernels.attention as A
from detjax.ops._attention import attention, decode_attention
CFG = A.gpu_config
def bits(x):
    x = np.asarray(x); return x.view(np.uint16)
dt, H = jnp.bfloat16, 256
B, S, N, K = 2, 1100, 8, 4
ks = jax.random.split(jax.random.key(H + 11), 3)
q = jax.random.normal(ks[0], (B, S, N, H), dt); k = jax.random.normal(ks[1], (B, S, K, H), dt); v = jax.random.normal(ks[2], (B, S, K, H), dt)
pre_cap = np.asarray(attention(q, k, v, logits_soft_cap=50.0)); pre_win = np.asarray(attention(q, k, v, sliding_window=300))
Ls = [2, 63, 64, 65, 129, 500, 1023, 1024, 1025, 1100, 777, 3]; bs = [i % 2 for i in range(len(Ls))]
maxlen = 1152
past = jnp.arange(maxlen)[None, :, None, None] >= jnp.array(Ls)[:, None, None, None]
kc = jnp.stack([jnp.pad(k[b], ((0, maxlen - S), (0, 0), (0, 0))) for b in bs]); vc = jnp.stack([jnp.pad(v[b], ((0, maxlen - S), (0, 0), (0, 0))) for b in bs])
kn, vn = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.inf, vc)
qd = jnp.stack([q[b, L - 2:L] for b, L in zip(bs, Ls)])
for tag in ("rule", "old41E1"):
    if tag == "old41E1":
        jax.clear_caches(); A.decode_value_splits = lambda *a, **k: 1; A.gpu_config = lambda h, kernel="prefill", dtype=None: CFG(h)
    d1 = np.asarray(decode_attention(qd, kn, vn, jnp.array(Ls, jnp.int32), logits_soft_cap=50.0))
    d2 = np.asarray(decode_attention(qd, kc, vc, jnp.array(Ls, jnp.int32), sliding_window=300))
    d3 = np.asarray(decode_attention(qd, kc, vc, jnp.array(Ls, jnp.int32), logits_soft_cap=50.0))
    for i, (b, L) in enumerate(zip(bs, Ls)):
        c1 = np.array_equal(bits(d1[i]), bits(pre_cap[b, L-2:L])); c2 = np.array_equal(bits(d2[i]), bits(pre_win[b, L-2:L])); c3 = np.array_equal(bits(d3[i]), bits(pre_cap[b, L-2:L]))
        if not (c1 and c2 and c3):
            n1 = int((bits(d1[i]) != bits(pre_cap[b, L-2:L])).sum()); n2 = int((bits(d2[i]) != bits(pre_win[b, L-2:L])).sum())
            print(tag, "b", b, "L", L, "cap+nan", c1, n1, "win", c2, n2, "cap", c3, "nan-in-d1", bool(np.isnan(d1[i]).any()), flush=True)
    print(tag, "done", flush=True)
