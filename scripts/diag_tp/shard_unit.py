"""One GPU: do the TP shard computations equal slices of the full ones? (tied unembedding bwd, softcap bwd)"""
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, ".")
from detjax import ops
rng = np.random.default_rng(0)
def eq(tag, a, b):
    a, b = np.asarray(a), np.asarray(b)
    print(f"{tag:55s} {'EQ' if np.array_equal(a, b) else 'DIFF'} {np.max(np.abs(a.astype(np.float64) - b)):.3g}", flush=True)
V, D = 256, 64
for (nb, t) in [(2, 9), (1, 9), (4, 5)]:
    e = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((nb, t, D)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((nb, t, V)), jnp.float32)
    att = lambda e_, x_: jax.vmap(lambda xx: ops.dot_general(xx, e_, (((1,), (1,)), ((), ()))))(x_)
    f = jax.jit(lambda e_, x_, dy_: jax.vjp(att, e_, x_)[1](dy_))
    de, dx = f(e, x, dy)
    de0, _ = f(e[:128], x, dy[..., :128]); de1, _ = f(e[128:], x, dy[..., 128:])
    eq(f"attend dE shard0 vs full rows  nb={nb} t={t}", de0, de[:128])
    eq(f"attend dE shard1 vs full rows  nb={nb} t={t}", de1, de[128:])
    cap = 30.0
    sc = lambda v: ops.isolated(lambda w: jnp.tanh(w * jnp.float32(1 / cap)) * jnp.float32(cap), v)
    g = jax.jit(lambda v, d: jax.vjp(sc, v)[1](d)[0])
    lg = x @ e.T * 3
    full = g(lg, dy); h0 = g(lg[..., :128], dy[..., :128])
    eq(f"softcap bwd shard vs full nb={nb} t={t}", h0, full[..., :128])
    eq(f"softcap fwd shard vs full nb={nb} t={t}", jax.jit(sc)(lg[..., :128]), jax.jit(sc)(lg)[..., :128])
    # matmul rows: M=128 vs M=256 for the transposed-gradient shape
    a = jnp.asarray(rng.standard_normal((nb, V, t)), jnp.float32); b = jnp.asarray(rng.standard_normal((nb, t, D)), jnp.float32)
    mm = jax.jit(lambda a_, b_: ops.matmul(a_, b_))
    eq(f"matmul [nb,{V},{t}]@[nb,{t},{D}] rows 0:128", mm(a[:, :128], b), mm(a, b)[:, :128])
