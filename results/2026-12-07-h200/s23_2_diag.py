"""Session 23, run 2: why decode = prefill failed at some t in s23_1 (head dims 64/128, 2200 keys).

For the data of benchmarks/mosaic_splits.decode_equals_prefill: prefill run to run (tokens layout,
2 warpgroups) and in the packed layout; per t, decode (split-parallel + merge kernel) run to run,
the one-kernel packed decode (split_parallel=False), each against the prefill's row, per batch row:
number of differing elements and the largest difference in bf16 ulps."""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.mosaic_splits import mosaic, one_kernel_decode, split_decode
from pallas_kernels import attention as _k


def u(x):
    return np.asarray(x).view(np.uint16).astype(np.int32)


def cmp(a, b):
    a, b = u(a), u(b)
    n = int(np.sum(a != b))
    return "same" if n == 0 else f"{n} differ (max {int(np.max(np.abs(a - b)))} ulp)"


for h in (64, 128):
    s = 2200
    kq, kk, kv = jax.random.split(jax.random.key(h), 3)
    q = jax.random.normal(kq, (2, s, 8, h), jnp.bfloat16)
    k = jax.random.normal(kk, (2, s, 2, h), jnp.bfloat16)
    v = jax.random.normal(kv, (2, s, 2, h), jnp.bfloat16)
    pos, lens = _k.default_q_positions(2, s, s), jnp.full((2,), s, jnp.int32)
    pf = jax.jit(mosaic)
    full = np.asarray(pf(q, k, v, pos, lens))
    full2 = np.asarray(pf(q, k, v, pos, lens))
    packed = np.asarray(jax.jit(lambda *a: mosaic(*a, layout="packed"))(q, k, v, pos, lens))
    print(f"H{h}: prefill run to run {cmp(full, full2)}; tokens vs packed prefill {cmp(full, packed)}", flush=True)
    pad = ((0, 0), (0, 2304 - s), (0, 0), (0, 0))
    kc, vc = jnp.pad(k, pad), jnp.pad(v, pad)
    dsp = jax.jit(split_decode)
    for t in (1022, 1023, 1024, 1025, 2047, 2048, 2199):
        lengths = jnp.array([t + 1, min(s, t + 300)], jnp.int32)
        rows = (t, int(lengths[1]) - 1)
        qd = jnp.stack([q[0, t:t + 1], q[1, rows[1]:rows[1] + 1]])
        args = (qd, kc, vc, lengths[:, None] - 1, lengths)
        d1, d2, d3 = (np.asarray(f(*args)) for f in (dsp, dsp, one_kernel_decode))
        for r in (0, 1):
            ref = full[r, rows[r]]
            print(f"  t={t} row{r} (len {int(lengths[r])}): split-par {cmp(d1[r, 0], ref)}; "
                  f"again {cmp(d2[r, 0], d1[r, 0])}; one-kernel {cmp(d3[r, 0], ref)}; "
                  f"packed prefill {cmp(packed[r, rows[r]], ref)}", flush=True)
