"""Session 16, run 5: the plain-XLA attention negative control (tests/test_fusion.py) failed 2 of 6
times on the H200. Six fresh draws in one process: which batch slices of which shape broke."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "tests")
from conftest import bitwise_equal  # noqa: E402
from detjax.nn._impl import XLA  # noqa: E402

f = jax.jit(lambda q, k, v: XLA.attention(q, k, v, causal=True))
for trial in range(6):
    rng = np.random.default_rng(trial)
    out = []
    for b, t, n, kh, h, dt in ((16, 128, 8, 4, 64, jnp.bfloat16), (16, 33, 4, 4, 128, jnp.float32)):
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), dt)
        k = jnp.asarray(rng.standard_normal((b, t, kh, h)), dt)
        v = jnp.asarray(rng.standard_normal((b, t, kh, h)), dt)
        full = f(q, k, v)
        br = [i for i in (0, 5, 15) if not bitwise_equal(f(q[i:i+1], k[i:i+1], v[i:i+1])[0], full[i])]
        br += [":7"] if not bitwise_equal(f(q[:7], k[:7], v[:7]), full[:7]) else []
        out.append(f"T{t} {jnp.dtype(dt).name} broke {br}")
    print(f"trial {trial}: " + "; ".join(out), flush=True)
