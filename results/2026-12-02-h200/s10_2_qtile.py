"""s10-2: prefill with 128-row q tiles (8 warps) against today's 64-row tiles: bits over masks,
soft-cap, GQA, head dims, dtypes and non-finite inputs; then time per configuration."""
import itertools, sys
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import attention as K
from benchmarks.bench_kernels import device_ms

def ops_for(b, t, s, n, kh, h, dt, seed, causal=True, window=None, cap=None, ragged=False, qoff=0,
            nan=False):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dt)
    k = jax.random.normal(ks[1], (b, s, kh, h), dt)
    v = jax.random.normal(ks[2], (b, s, kh, h), dt)
    if nan:
        v = v.at[0, s // 2].set(jnp.nan).at[0, s // 2 + 3].set(jnp.inf)
    qpos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + qoff, (b, t))
    kvl = jnp.array([s - 37 * i for i in range(b)] if ragged else [s] * b, jnp.int32)
    pre = K.prepare(q, k, v, qpos, kvl, causal=causal, sliding_window=window)
    cfg = K.AttnConfig(scale=h ** -0.5, soft_cap=cap, backend="gpu")
    return pre, cfg

cases = []
for dt in (jnp.bfloat16, jnp.float16):
    for h in ((64, 128, 256) if dt == jnp.bfloat16 else (128, 256)):
        cases += [
            (f"{jnp.dtype(dt).name} H{h} causal T=S=1100 N8K2", dict(b=2, t=1100, s=1100, n=8, kh=2, h=h, dt=dt)),
            (f"{jnp.dtype(dt).name} H{h} window100 cap30 ragged N4K4", dict(b=3, t=700, s=700, n=4, kh=4, h=h, dt=dt, window=100, cap=30.0, ragged=True)),
            (f"{jnp.dtype(dt).name} H{h} chunk 65 queries at 2000 of S=2100 N8K1", dict(b=2, t=65, s=2100, n=8, kh=1, h=h, dt=dt, qoff=2000)),
            (f"{jnp.dtype(dt).name} H{h} non-causal N2K1 nan/inf value", dict(b=2, t=300, s=1500, n=2, kh=1, h=h, dt=dt, causal=False, nan=True)),
        ][: 4 if dt == jnp.bfloat16 else 2]
configs = [(128, (8, 2)), (128, (8, 1))]
bad = 0
for i, (name, kw) in enumerate(cases):
    pre, cfg = ops_for(seed=i, **kw)
    base = [np.asarray(x) for x in jax.jit(lambda *a: K.attention_fwd_call(*a, cfg))(*pre)]
    res = []
    for bq, c in configs:
        try:
            out = [np.asarray(x) for x in jax.jit(lambda *a, bq=bq, c=c: K.attention_fwd_call(*a, cfg, block_q=bq, config=c))(*pre)]
            eq = all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(base, out))
            res.append("=" if eq else "DIFF")
            bad += not eq
        except Exception as e:
            res.append(type(e).__name__)
    print(f"bits {name}: " + " ".join(f"q{bq}/w{c[0]}s{c[1]}:{r}" for (bq, c), r in zip(configs, res)), flush=True)
print(f"bits: {bad} differing (case, config) pairs", flush=True)
perf = [(1, 8192, 128, 1), (8, 2048, 128, 4), (1, 2048, 256, 4), (1, 8192, 256, 4), (1, 4096, 64, 1)]
for b, t, h, kh in perf:
    pre, cfg = ops_for(b, t, t, 8, kh, h, jnp.bfloat16, 5)
    line = f"perf B{b} T{t} H{h} K{kh}: q64 {device_ms(lambda *a: K.attention_fwd_call(*a, cfg)[0], *pre, iters=10):.3f}"
    for bq, c in configs + [(128, (4, 2)), (128, (8, 3))]:
        try:
            ms = device_ms(lambda *a, bq=bq, c=c: K.attention_fwd_call(*a, cfg, block_q=bq, config=c)[0], *pre, iters=10)
            line += f"  q{bq}w{c[0]}s{c[1]} {ms:.3f}"
        except Exception as e:
            line += f"  q{bq}w{c[0]}s{c[1]} {type(e).__name__}"
    print(line + " ms", flush=True)
