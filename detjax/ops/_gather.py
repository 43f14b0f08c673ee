"""Row lookup (``table[ids]``) whose gradient is deterministic run to run.

The gradient of ``jnp.take(table, ids, axis=0)`` is a scatter-add into ``table``'s shape. With
repeated ids (a token appearing twice in a batch) XLA:GPU adds the colliding rows with atomics, in an
order left to the scheduler: the embedding gradient then changes from run to run (measured on two
H200s: 4.8e-7 between two runs of the same program). ``embedding_lookup`` has the same forward and a
backward with a fixed order:

1. the ids are sorted by a stable sort (ties keep their position order);
2. the cotangent rows of each run of equal ids are summed in float32 by a pairwise tree over their
   rank in the run (rank 0 = the id's first position): ``((g0 + g1) + (g2 + g3)) + ...``, no atomics;
3. each id's total (at rank 0) is written to its row with a scatter whose indices are unique (rows
   of other positions go to a discarded extra row); untouched rows are 0.

An id's gradient depends only on its own positions' cotangents, in position order: not on the other
ids of the batch, and not on the table's size, so a vocabulary shard of the table gets bitwise the
rows of the whole table's gradient (tensor parallelism relies on it). It never depends on the
scheduler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from detjax.ops._checks import check_array, check_float_dtype
from detjax.ops._elementwise import seal_bwd

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


@seal_bwd
def _bwd(res, g):
    ids, marker = res
    V, dtype = marker.shape[0], marker.dtype
    shape = (V,) + g.shape[ids.ndim:]
    flat = ids.reshape(-1)
    flat = jnp.where(flat < 0, flat + V, flat)
    flat = jnp.where((flat >= 0) & (flat < V), flat, V)   # out of range: no gradient (row V)
    n = flat.shape[0]
    if n == 0:
        return jnp.zeros(shape, dtype), None
    rows = g.reshape((n,) + shape[1:]).astype(jnp.float32)
    order = jnp.argsort(flat, stable=True)
    ts = flat[order]
    gs = rows[order]
    pos = jnp.arange(n, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((1,), bool), ts[1:] != ts[:-1]])
    rank = pos - lax.cummax(jnp.where(first, pos, 0))      # position within the run of equal ids
    bshape = (n,) + (1,) * (len(shape) - 1)
    # Pairwise tree over the rank, anchored at each run's start: in round k, rank r (a multiple of
    # 2^(k+1)) absorbs the partial sum at rank r + 2^k of the same id. The association depends only
    # on how many times the id occurs, never on where its run sits in the sorted array (so a
    # vocabulary shard, which sorts fewer ids, builds the same tree as the whole table).
    step = 1
    while step < n:
        other = jnp.concatenate([gs[step:], jnp.zeros((step,) + gs.shape[1:], gs.dtype)])
        other_id = jnp.concatenate([ts[step:], jnp.full((step,), -1, ts.dtype)])
        take = (rank % (2 * step) == 0) & (other_id == ts)
        gs = jnp.where(take.reshape(bshape), gs + other, gs)
        step *= 2
    idx = jnp.where(first, ts, V)                     # one writer per id (its rank 0); rest to row V
    out = jnp.zeros((V + 1,) + tuple(shape[1:]), jnp.float32).at[idx].set(gs)
    return out[:V].astype(dtype), None


_lookup.defvjp(_fwd, _bwd)
