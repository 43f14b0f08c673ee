"""embedding_lookup: jnp.take's rows, with a gradient whose order is fixed (no atomics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPE_IDS, DTYPES, assert_bitwise_equal, randn
from detjax import ops


def _ids(rng, shape, v):
    ids = rng.integers(0, v, size=shape)
    ids.flat[: max(1, ids.size // 3)] = ids.flat[0]          # many repeats of one id
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_is_take_and_gradient_close_and_repeatable(rng, dtype):
    table = randn(rng, (37, 24), dtype)
    ids = _ids(rng, (3, 11), 37)
    assert_bitwise_equal(ops.embedding_lookup(table, ids), jnp.take(table, ids, axis=0), "forward")
    g = randn(rng, (3, 11, 24), jnp.float32)
    loss = lambda fn: (lambda t: jnp.vdot(fn(t).astype(jnp.float32), g))
    ours = jax.jit(jax.grad(loss(lambda t: ops.embedding_lookup(t, ids))))
    ref = jax.grad(loss(lambda t: jnp.take(t.astype(jnp.float32), ids, axis=0)))(table)
    a = ours(table)
    assert a.dtype == table.dtype
    assert_bitwise_equal(ours(table), a, "run to run")
    exact = np.zeros((37, 24))
    np.add.at(exact, np.asarray(ids).reshape(-1), np.asarray(g, np.float64).reshape(-1, 24))
    tol = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1e-2}
    err = np.max(np.abs(np.asarray(a, np.float64) - exact)) / np.max(np.abs(exact))
    assert err < tol[jnp.dtype(dtype)], err
    ref_err = np.max(np.abs(np.asarray(ref, np.float64) - exact)) / np.max(np.abs(exact))
    # as close as XLA's f32 scatter-add, up to the one rounding to the table's dtype
    assert err <= max(2 * ref_err, float(jnp.finfo(dtype).eps)), (err, ref_err)


def test_out_of_range_ids_like_take(rng):
    table = randn(rng, (5, 3), jnp.float32)
    ids = jnp.array([-1, 5, 7, 2, -6, 2], jnp.int32)
    got = ops.embedding_lookup(table, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(table, ids, axis=0)))
    g = jax.grad(lambda t: jnp.nansum(ops.embedding_lookup(t, ids)))(table)
    r = jax.grad(lambda t: jnp.nansum(jnp.take(t, ids, axis=0)))(table)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))   # -1 wraps; 5, 7, -6: no gradient


def test_gradient_order_fixed_whatever_the_position_of_repeats(rng):
    """The per-id sum is over positions in ascending order: permuting *other* ids never changes it."""
    table = randn(rng, (9, 16), jnp.float32)
    ids = jnp.array([4, 1, 4, 2, 4, 7], jnp.int32)
    g = randn(rng, (6, 16), jnp.float32)
    grad = lambda ids, g: jax.grad(lambda t: jnp.vdot(ops.embedding_lookup(t, ids), g))(table)
    a = grad(ids, g)
    perm = jnp.array([0, 3, 2, 5, 4, 1])                          # id-4 rows keep their order
    b = grad(ids[perm], g[perm])
    assert_bitwise_equal(a[4], b[4], "id 4")


def test_vocabulary_shard_gets_the_same_gradient_rows(rng):
    """A shard of the table (other ids mapped out of range) gets bitwise the whole table's rows."""
    table = randn(rng, (40, 8), jnp.float32)
    ids = _ids(rng, (4, 33), 40)
    g = randn(rng, (4, 33, 8), jnp.float32)
    full = jax.grad(lambda t: jnp.vdot(jnp.nan_to_num(ops.embedding_lookup(t, ids)), g))(table)
    for lo, hi in [(0, 10), (10, 20), (20, 40)]:
        local = ids - lo
        local = jnp.where((local >= 0) & (local < hi - lo), local, hi - lo)
        part = jax.grad(lambda t: jnp.vdot(jnp.nan_to_num(ops.embedding_lookup(t, local)), g))(table[lo:hi])
        assert_bitwise_equal(part, full[lo:hi], f"rows {lo}:{hi}")


@pytest.mark.parametrize("call, exc, words", [
    (lambda: ops.embedding_lookup(jnp.ones((4, 2)), jnp.ones((3,))), TypeError, "ids must be an integer"),
    (lambda: ops.embedding_lookup(jnp.ones((4, 2), jnp.int32), jnp.ones((3,), jnp.int32)), TypeError, "table"),
    (lambda: ops.embedding_lookup(jnp.float32(1), jnp.ones((3,), jnp.int32)), ValueError, "table must have rank"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
