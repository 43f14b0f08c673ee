"""detjax.check: batch_invariance reports and the divergence finder, on planted cases."""

from __future__ import annotations

import inspect
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax import check, ops

from conftest import bits

K, N = 1024, 128


def _line_of(fn, marker):
    """``file:line`` of the source line of ``fn`` holding ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if marker in text:
            return f"{inspect.getsourcefile(fn)}:{start + i}"
    raise AssertionError(marker)


def _differs(a, b) -> bool:
    return not np.array_equal(bits(a), bits(b))


@pytest.fixture(scope="module")
def xw():
    x = jax.random.normal(jax.random.key(0), (8, K), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (K, N), jnp.float32)
    return x, w


@pytest.fixture(scope="module")
def dot_premise(xw):
    """The planted case: XLA:CPU's f32 dot gives row 0 different bits for M=1 and M=8."""
    x, w = xw
    if not _differs(jnp.dot(x[:1], w)[0], jnp.dot(x, w)[0]):
        pytest.skip("XLA's dot happens to be batch-invariant for this shape on this machine")


@pytest.fixture(scope="module")
def sum_premise(xw):
    x, _ = xw
    if not _differs(jnp.sum(x[:1], -1), jnp.sum(x, -1)[:1]):
        pytest.skip("XLA's row sum happens to be batch-invariant for this shape on this machine")


# ---------------------------------------------------------------------------------------------
# batch_invariance

def test_batch_invariance_detjax_ok(xw):
    x, w = xw
    rep = check.batch_invariance(lambda x: {"s": ops.sum(x, axis=-1), "y": ops.matmul(x, w)},
                                 x[:4])
    assert rep.ok, str(rep)
    assert [leaf.path for leaf in rep.leaves] == ["['s']", "['y']"]
    assert rep["['y']"].shape == (N,) and rep["['y']"].dtype == "float32"
    for leaf in rep.leaves:
        assert all(g.ok is True and g.n_differ == 0 and g.n_compared > 0 for g in leaf.guarantees)
    assert rep.positions == {1: (0,), 2: (0, 1), 7: (0, 3, 6)}
    assert "OK" in str(rep)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] is True and d["leaves"][1]["batch"]["by_batch_size"] == {"1": 0.0, "2": 0.0,
                                                                            "7": 0.0}


def test_batch_invariance_xla_dot_fails(xw, dot_premise):
    x, w = xw
    rep = check.batch_invariance(lambda x: jnp.dot(x, w), x, batch_sizes=(1, 8))
    assert not rep.ok
    (leaf,) = rep.leaves
    assert leaf.batch.ok is False and leaf.batch.max_abs_diff > 0
    assert leaf.batch.by_batch_size[1] == 0.0 and leaf.batch.by_batch_size[8] > 0
    assert "batch size 8" in leaf.batch.first
    assert leaf.run_to_run.ok is True
    s = str(rep)
    assert "FAILED" in s and "DIFFERS" in s and "batch size 8" in s


def test_batch_invariance_bitwise_not_allclose():
    # -0.0 vs +0.0: equal as numbers, different bits.
    def f(x):
        return x * 0.0 * (-1.0 if x.shape[0] > 1 else 1.0)
    rep = check.batch_invariance(f, jnp.ones((3, 4)), batch_sizes=(1, 2))
    leaf = rep.leaves[0]
    assert leaf.batch.ok is False and leaf.batch.max_abs_diff == 0.0 and leaf.batch.n_differ == 16  # 2 batches x 2 rows x 4
    assert leaf.vmap.ok is True  # vmap traces the single-example program: [1, 4]


def test_non_batched_leaf_static_args_and_pytrees():
    def f(d, scale, name):
        assert name == "static"
        return {"per_example": d["a"] * scale + d["b"][:, :1], "loss": jnp.sum(d["a"])}
    args = ({"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((3, 2))}, 2.0, "static")
    rep = check.batch_invariance(f, *args, batch_sizes=(2,), positions=(-1,))
    assert rep.positions == {2: (1,)}
    assert rep["['loss']"].batch.ok is None and "batch axis" in rep["['loss']"].batch.note
    assert rep["['loss']"].vmap.ok is True  # vmap(f on one example)[i] == f(example i)
    assert rep.ok


def test_vmap_failure_and_run_to_run_failure_are_reported():
    counter = itertools.count()

    def host_fn(x):  # works eagerly, not under vmap
        return jnp.asarray(np.asarray(x) * 2)
    rep = check.batch_invariance(host_fn, jnp.ones((2, 3)), jit=False)
    assert rep.leaves[0].batch.ok and rep.leaves[0].vmap.ok is False
    assert "jax.vmap(fn) raised" in rep.leaves[0].vmap.note and not rep.ok

    def drifting(x):  # a different result every call
        return x + float(next(counter))
    rep = check.batch_invariance(drifting, jnp.ones((2, 3)), batch_sizes=(1,), jit=False,
                                 n_runs=3)
    assert rep.leaves[0].run_to_run.ok is False
    rep = check.batch_invariance(lambda x: x, jnp.ones((2, 3)), n_runs=1)
    assert rep.leaves[0].run_to_run.ok is None and rep.ok


def test_batch_invariance_bad_input():
    with pytest.raises(ValueError, match="same number"):
        check.batch_invariance(lambda a, b: a, jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match=">= 1"):
        check.batch_invariance(lambda a: a, jnp.ones((2, 3)), batch_sizes=(0,))
    with pytest.raises(TypeError):
        check.batch_invariance(lambda a: a, jnp.ones((2, 3)), n_runs="2")
    with pytest.raises(ValueError, match="at least one array"):
        check.batch_invariance(lambda: 1.0)


# ---------------------------------------------------------------------------------------------
# find_divergence

def _dot_fn(w):
    def f(x):
        h = jnp.tanh(x)
        y = jnp.dot(h, w)  # PLANTED-DOT
        return jnp.exp(y * 0.01)
    return f


def test_finder_names_dot_general_and_line(xw, dot_premise):
    x, w = xw
    f = _dot_fn(w)
    d = check.find_divergence(f, x[3:4], x, row_b=3)
    assert d and d.diverged
    assert d.primitive == "dot_general"
    assert d.source.startswith(_line_of(f, "PLANTED-DOT"))
    assert d.inputs_equal is True  # tanh agreed: the dot itself made the difference
    assert d.shape_a == (1, N) and d.shape_b == (8, N) and d.dtype == "float32"
    assert d.max_abs_diff > 0 and 0 < d.n_differ <= d.n_compared == N
    s = str(d)
    assert "dot_general" in s and _line_of(f, "PLANTED-DOT") in s
    json.dumps(d.to_dict())


def test_finder_names_reduce_sum(xw, sum_premise):
    x, _ = xw

    def g(x):
        h = x + 1.0
        return jnp.sum(h, axis=-1) * 2.0  # PLANTED-SUM
    h1 = x + 1.0
    if not _differs(jnp.sum(h1[:1], -1), jnp.sum(h1, -1)[:1]):
        pytest.skip("premise does not hold for x + 1 on this machine")
    d = check.find_divergence(g, x[:1], x)
    assert d.primitive == "reduce_sum" and d.inputs_equal is True
    assert d.source.startswith(_line_of(g, "PLANTED-SUM"))


def test_finder_names_injected_difference():
    x = jax.random.normal(jax.random.key(2), (5, 16), jnp.float32)

    def scaled(x):
        y = jnp.exp(x)
        return y * (1.0 + 1e-7 * (x.shape[0] > 1))  # PLANTED-MUL
    d = check.find_divergence(scaled, x[:1], x)
    assert d.primitive == "mul" and d.source.startswith(_line_of(scaled, "PLANTED-MUL"))
    assert d.inputs_equal is False  # the constant differs, exp(x) agrees

    def where(x):
        y = jnp.exp(x)
        return jnp.where(x.shape[0] > 1, y * (1 + 1e-7), y)  # PLANTED-WHERE
    d = check.find_divergence(where, x[2:3], x, row_b=2)
    assert d.primitive == "select_n" and d.source.startswith(_line_of(where, "PLANTED-WHERE"))
    assert "_where" in d.path  # found inside jnp.where's jit


def test_finder_no_divergence(xw):
    x, w = xw
    d = check.find_divergence(lambda x: ops.matmul(jnp.tanh(x), w), x[6:7], x, row_b=6)
    assert not d and d.diverged is False and d.primitive is None
    assert d.n_compared_values > 0 and "no divergence" in str(d)
    d = check.find_divergence(jnp.exp, (x[:1],), (x,))
    assert not d


def test_finder_recurses_into_jit_custom_jvp_custom_vjp(xw, dot_premise):
    x, w = xw

    @jax.custom_jvp
    def cj(h):
        return jnp.dot(h, w)  # PLANTED-CJVP
    cj.defjvp(lambda p, t: (cj(p[0]), jnp.dot(t[0], w)))

    @jax.custom_vjp
    def cv(h):
        return jnp.dot(h, w)  # PLANTED-CVJP
    cv.defvjp(lambda h: (cv(h), None), lambda _, g: (g @ w.T,))

    @jax.jit
    def inner(h):
        return jnp.tanh(h)

    for fn, marker, kind in ((cj, "PLANTED-CJVP", "custom_jvp_call"),
                             (cv, "PLANTED-CVJP", "custom_vjp_call")):
        def f(x):
            return jax.jit(lambda h: fn(inner(h)))(x)
        d = check.find_divergence(f, x[:1], x)
        assert d.primitive == "dot_general", str(d)
        assert d.source.startswith(_line_of(fn.fun if hasattr(fn, "fun") else fn, marker))
        assert kind in d.path and "jit" in d.path


def test_finder_custom_selection_and_structure_difference(xw, dot_premise):
    x, w = xw

    def f(x):
        if x.shape[0] > 1:  # shape-dependent extra equations in run b only
            x = jnp.transpose(jnp.transpose(x))
        return jnp.dot(x, w)  # PLANTED-DOT2
    d = check.find_divergence(f, x[:1], x)
    assert d.primitive == "dot_general" and "structure" in d.note
    assert d.source.startswith(_line_of(f, "PLANTED-DOT2"))
    # Custom selection: row 5 of b against a; values without 8 rows are skipped.
    d = check.find_divergence(lambda x: jnp.exp(x), x[5:6], x,
                              select_b=lambda v: v[5:6] if v.ndim and v.shape[0] == 8 else None)
    assert not d and d.n_compared_values == 1
    d = check.find_divergence(lambda x: jnp.exp(x), x[5:6], x,
                              select_b=lambda v: v[4:5] if v.ndim and v.shape[0] == 8 else None)
    assert d.primitive == "exp" and d.inputs_equal is False and "already differs" in d.note


def test_finder_flattened_batch_axis():
    x = jax.random.normal(jax.random.key(3), (4, 3, 8), jnp.float32)

    def f(x):
        b = x.shape[0]
        y = jnp.reshape(x, (b * 3, 8))  # [B*T, D]: blocks of 3 rows per example
        y = y * (1.0 + 1e-7 * (b > 1))  # PLANTED-FLAT
        return y.reshape(b, 3, 8)
    d = check.find_divergence(f, x[2:3], x, row_b=2)
    assert d.primitive == "mul" and d.n_compared == 24
    assert d.source.startswith(_line_of(f, "PLANTED-FLAT"))


def test_finder_bad_rows():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="row_b"):
        check.find_divergence(jnp.exp, x[:1], x, row_b=4)
