"""Session 5: decode-attention variants (rows per program, warps, stages): bits and speed."""
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from benchmarks.bench_kernels import device_ms
import pallas_kernels.attention as A
from detjax.ops._attention import attention, decode_attention

orig_cfg, orig_rows = A.gpu_config, A.decode_block_rows

def set_variant(name):
    jax.clear_caches()
    A.gpu_config, A.decode_block_rows = orig_cfg, orig_rows
    if name.startswith("r64"):
        A.decode_block_rows = lambda r: 64
    for tag, val in (("w8", 8), ("w4", 4)):
        if tag in name:
            A.gpu_config = lambda h, f=A.gpu_config, val=val: (val, f(h)[1]) if h > 128 else f(h)
    for st in (1, 2, 3):
        if f"s{st}" in name:
            A.gpu_config = lambda h, f=A.gpu_config, st=st: (f(h)[0], st) if h > 128 else f(h)

def bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)

key = jax.random.key(0)
kq, kk, kv = jax.random.split(key, 3)
# bit checks at head dims 256 and 128, with soft-cap, window, NaN past lengths
checks = []
for H in (256, 128):
    B, S, N, K = 3, 2500, 8, 4
    kc = jax.random.normal(kk, (B, S, K, H), jnp.bfloat16)
    vc = jax.random.normal(kv, (B, S, K, H), jnp.bfloat16)
    q2 = jax.random.normal(kq, (B, S, N, H), jnp.bfloat16)
    dl = jnp.array([2500, 1100, 65], jnp.int32)
    idx = jnp.arange(S)[None, :, None, None] >= dl[:, None, None, None]
    checks.append((H, kc, vc, q2, dl, jnp.where(idx, jnp.nan, kc), jnp.where(idx, jnp.inf, vc)))

def outputs():
    out = []
    for H, kc, vc, q2, dl, kcn, vcn in checks:
        q1 = q2[:, :1]
        out += [decode_attention(q1, kc, vc, dl), decode_attention(q1, kcn, vcn, dl),
                decode_attention(q1, kc, vc, dl, logits_soft_cap=50.0, sliding_window=700),
                decode_attention(q2[:, :3], kc, vc, dl),
                attention(q2[:, :700], kc[:, :700], vc[:, :700], logits_soft_cap=50.0)]
    return [bits(o) for o in out]

def dec_eq_prefill():
    res = []
    for H, kc, vc, q2, dl, kcn, vcn in checks:
        for L in (1, 64, 65, 1023, 1024, 1025, 2500):
            pre = attention(q2[:, :L], kc[:, :L], vc[:, :L], logits_soft_cap=50.0)
            d = decode_attention(q2[:, L - 1:L], kc, vc, jnp.full((3,), L, jnp.int32), logits_soft_cap=50.0)
            res.append(bool(np.array_equal(bits(pre[:, -1:]), bits(d))))
    return res

perf = [("gemma2 B8 S640 L576 H256 K4 cap50", 8, 640, 576, 256, 4, 50.0),
        ("B8 S8192 H256 K4", 8, 8192, 8192, 256, 4, None),
        ("B64 S1024 H256 K4", 64, 1024, 1024, 256, 4, 50.0),
        ("B8 S8192 H128 K4", 8, 8192, 8192, 128, 4, None),
        ("B64 S8192 H128 K4", 64, 8192, 8192, 128, 4, None),
        ("B1 S8192 H128 K1", 1, 8192, 8192, 128, 1, None)]
variants = sys.argv[1].split(",")
ref = None
rows = []
for var in variants:
    set_variant(var)
    try:
        bb = outputs()
        dp = dec_eq_prefill()
    except Exception as e:
        print(var, "ERR", type(e).__name__, str(e)[:300], flush=True); continue
    if ref is None: ref = bb
    same = [bool(np.array_equal(x, y)) for x, y in zip(bb, ref)]
    print(f"{var}: bits_same_as_{variants[0]}={all(same)} {same} decode=prefill {sum(dp)}/{len(dp)}", flush=True)
    for name, b, s, L, H, K, cap in perf:
        q = jax.random.normal(kq, (b, 1, 8, H), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, K, H), jnp.bfloat16)
        ln = jnp.full((b,), L, jnp.int32)
        ms = device_ms(lambda q, k, v, l: decode_attention(q, k, v, l, logits_soft_cap=cap), q, k, v, ln)
        gbs = 2 * b * L * K * H * 2 / ms / 1e6
        rows.append((name, var, ms, gbs))
        print(f"  {name:36s} {var:10s} {ms*1e3:8.1f} us {gbs:6.0f} GB/s", flush=True)
print("\n== table ==")
for r in sorted(rows):
    print(f"{r[0]:36s} {r[1]:10s} {r[2]*1e3:8.1f} us {r[3]:6.0f} GB/s")
