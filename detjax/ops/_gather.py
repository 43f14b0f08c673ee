"""Row lookup (``table[ids]``) whose gradient is deterministic run to run.

The gradient of ``jnp.take(table, ids, axis=0)`` is a scatter-add into ``table``'s shape. With
repeated ids (a token appearing twice in a batch) XLA:GPU adds the colliding rows with atomics, in an
order left to the scheduler: the embedding gradient then changes from run to run (measured on two
H200s: 4.8e-7 between two runs of the same program). ``embedding_lookup`` has the same forward and a
backward with a fixed order:

1. the ids are sorted by a stable sort (ties keep their position order);
2. the cotangent rows, in that order, are summed per run of equal ids by a segmented
   ``lax.associative_scan`` in float32 (a fixed tree of adds, no atomics);
3. each id's total (at the end of its run) is written to its row with a scatter whose indices are
   unique (rows of other positions go to a discarded extra row); untouched rows are 0.

The order depends on which ids the batch holds (like any weight gradient it sums over the batch);
it never depends on the scheduler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from detjax.ops._checks import check_array, check_float_dtype

__all__ = ["embedding_lookup"]


def embedding_lookup(table, ids):
    """``table[ids]`` for ``table: [V, ...]`` and integer ``ids`` of any shape, with a
    deterministic gradient for ``table`` (see the module docstring). Out-of-range ids behave as in
    ``jnp.take``: negative ids count from the end once, ids past the table give NaN rows and no
    gradient."""
    table = check_array(table, "table")
    ids = check_array(ids, "ids")
    if table.ndim < 1:
        raise ValueError(f"table must have rank >= 1 (rows to look up); got shape {tuple(table.shape)}")
    check_float_dtype(table, "table")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be an integer array; got {ids.dtype} with shape {tuple(ids.shape)}")
    return _lookup(table, ids.astype(jnp.int32))


@jax.custom_vjp
def _lookup(table, ids):
    return jnp.take(table, ids, axis=0)


def _fwd(table, ids):
    # a [V, 0] array carries V and the dtype as a residual (residuals must be JAX values)
    return _lookup(table, ids), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _seg_add(a, b):
    fa, va = a
    fb, vb = b
    return fa | fb, jnp.where(fb, vb, va + vb)


def _bwd(res, g):
    ids, marker = res
    V, dtype = marker.shape[0], marker.dtype
    shape = (V,) + g.shape[ids.ndim:]
    flat = ids.reshape(-1)
    flat = jnp.where(flat < 0, flat + V, flat)
    flat = jnp.where((flat >= 0) & (flat < V), flat, V)   # out of range: no gradient (row V)
    n = flat.shape[0]
    rows = g.reshape((n,) + shape[1:]).astype(jnp.float32)
    if n == 0:
        return jnp.zeros(shape, dtype), None
    order = jnp.argsort(flat, stable=True)
    ts = flat[order]
    gs = rows[order]
    start = jnp.concatenate([jnp.ones((1,), bool), ts[1:] != ts[:-1]])
    end = jnp.concatenate([ts[1:] != ts[:-1], jnp.ones((1,), bool)])
    bshape = (n,) + (1,) * (len(shape) - 1)
    _, sums = lax.associative_scan(_seg_add, (start.reshape(bshape), gs), axis=0)
    idx = jnp.where(end, ts, V)                       # one writer per id; the rest to row V
    out = jnp.zeros((V + 1,) + tuple(shape[1:]), jnp.float32).at[idx].set(sums)
    return out[:V].astype(dtype), None


_lookup.defvjp(_fwd, _bwd)
