"""Sealed backward rules and ``isolated``'s own backward.

XLA:GPU contracts a multiply and an add that share a fusion into one FMA, so elementwise code that
XLA fuses with different neighbours in different programs (one device vs a tensor-parallel shard, a
decode loop vs a prefill) can round differently. detjax keeps its own elementwise code out of that:
every ``custom_vjp`` backward rule of ``detjax.ops`` takes its inputs and gives its results through
optimization barriers (``seal_bwd``), and ``isolated`` is isolated in the backward pass too. The
rounding itself only differs on a GPU; these CPU tests check the structure (a test fails if a seal
or the isolated backward is removed) and that the gradients stay right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_bitwise_equal, randn
from detjax import ops
from detjax.ops._elementwise import seal_bwd


def _count(jaxpr, name):
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == name
        for p in e.params.values():
            for q in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(q, "jaxpr", None)
                if inner is not None:
                    n += _count(getattr(inner, "jaxpr", inner), name)
                elif hasattr(q, "eqns"):
                    n += _count(q, name)
    return n


def _bwd_barriers(f, *args):
    """Optimization barriers in the backward pass of ``f`` (grad jaxpr minus forward jaxpr)."""
    fwd = _count(jax.make_jaxpr(f)(*args).jaxpr, "optimization_barrier")
    grad = _count(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a))))(*args).jaxpr,
                  "optimization_barrier")
    return grad - fwd


SEALED_OPS = {
    "sum": lambda x: ops.sum(x, axis=-1),
    "mean": lambda x: ops.mean(x, axis=-1),
    "max": lambda x: ops.max(x, axis=-1),
    "logsumexp": lambda x: ops.logsumexp(x, axis=-1),
    "softmax": lambda x: ops.softmax(x, axis=-1) * jnp.arange(x.shape[-1], dtype=x.dtype),
    "log_softmax": lambda x: ops.log_softmax(x, axis=-1) * jnp.arange(x.shape[-1], dtype=x.dtype),
    "rms_norm": lambda x: ops.rms_norm(x, jnp.linspace(-0.5, 0.5, x.shape[-1], dtype=x.dtype)),
    "embedding_lookup": lambda x: ops.embedding_lookup(x, jnp.asarray([[0, 2, 2], [1, 0, 2]])),
}


@pytest.mark.parametrize("name", sorted(SEALED_OPS))
def test_backward_rules_are_sealed(name):
    x = randn(np.random.default_rng(0), (3, 16), jnp.float32)
    assert _bwd_barriers(SEALED_OPS[name], x) >= 2, f"{name}: backward rule not sealed"


def test_seal_bwd_keeps_the_rule_and_adds_barriers():
    @jax.custom_vjp
    def f(x, y):
        return x * y

    def f_fwd(x, y):
        return f(x, y), (x, y)

    def f_bwd(res, g):
        x, y = res
        return g * y + 0.5 * x, g * x

    f.defvjp(f_fwd, seal_bwd(f_bwd))
    x, y = jnp.arange(4.0), jnp.arange(4.0) + 2
    gx, gy = jax.grad(lambda a, b: jnp.sum(f(a, b)), argnums=(0, 1))(x, y)
    np.testing.assert_array_equal(gx, y + 0.5 * x)
    np.testing.assert_array_equal(gy, x)
    assert _bwd_barriers(lambda a: f(a, y), x) == 2        # one on the way in, one on the way out


@pytest.mark.parametrize("fn, name", [
    (lambda g: jax.nn.gelu(g, approximate=True), "gelu"),
    (lambda v: jnp.tanh(v * jnp.float32(1 / 30.0)) * jnp.float32(30.0), "softcap"),
    (lambda a, b, c, s: a * c - b * s, "rope half"),
])
def test_isolated_backward_is_isolated_and_exact(fn, name):
    rng = np.random.default_rng(1)
    n_args = fn.__code__.co_argcount
    args = [randn(rng, (5, 7), jnp.float32) for _ in range(n_args)]
    iso = lambda *a: ops.isolated(fn, *a)
    # the backward evaluates each argument's cotangent behind barriers of its own: one per input
    # (the arguments and the output cotangent) and one on the result; plain autodiff of the
    # forward barriers gives fewer
    assert _bwd_barriers(iso, *args) >= n_args * (n_args + 2), name
    argnums = tuple(range(n_args))
    got = jax.grad(lambda *a: jnp.sum(iso(*a) * jnp.cos(a[0])), argnums=argnums)(*args)
    want = jax.grad(lambda *a: jnp.sum(fn(*a) * jnp.cos(a[0])), argnums=argnums)(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6)


def test_isolated_multiple_outputs_backward_and_vmap():
    x = randn(np.random.default_rng(2), (4, 6), jnp.float32)
    sincos = lambda a: ops.isolated(lambda t: (jnp.sin(t), jnp.cos(t)), a)
    g = jax.grad(lambda a: jnp.sum(sincos(a)[0] * 2.0 + sincos(a)[1]))(x)
    np.testing.assert_allclose(g, 2 * jnp.cos(x) - jnp.sin(x), rtol=2e-6, atol=1e-6)
    row = jax.jit(jax.grad(lambda a: jnp.sum(sincos(a)[0])))
    vm = jax.jit(jax.vmap(jax.grad(lambda a: jnp.sum(sincos(a)[0]))))
    assert_bitwise_equal(vm(x)[2], row(x[2]))


def test_isolated_mixed_shapes_fall_back_to_plain_barriers():
    """Arguments of different shapes (or integers) keep the barrier-only path, differentiable by
    autodiff as before."""
    x, s = jnp.arange(6.0).reshape(2, 3), jnp.float32(2.0)
    g = jax.grad(lambda a: jnp.sum(ops.isolated(lambda u, v: u * v, a, s)))(x)
    np.testing.assert_array_equal(g, jnp.full((2, 3), 2.0))
    i = jnp.arange(6, dtype=jnp.int32)
    np.testing.assert_array_equal(ops.isolated(lambda u: u * 2, i), i * 2)
