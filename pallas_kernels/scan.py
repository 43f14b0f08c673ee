"""Cumulative (scan) kernels with a fixed order: cumsum, cummax, cummin, cumlogsumexp.

Scan order (the product; change ``SCAN_CHUNK`` => bump ``order.KERNELS_VERSION``)
----------------------------------------------------------------------------------
Input is ``[R, N]``; every row is scanned by its own program (grid over rows), so rows never share
arithmetic and neither the batch size nor a row's position can change its bits.

Within a row (``C = SCAN_CHUNK`` = 256), accumulating in float32 (float64 for float64 inputs):

1. The row is read in chunks ``[j * C, (j + 1) * C)`` anchored at column 0, in ascending ``j``.
   Lanes past ``N`` are masked to the operation's identity (0 for sums, -inf for max/logsumexp,
   +inf for min).
2. In-chunk scan: one inclusive scan of the length-``C`` vector, always of exactly that shape
   (interpret: ``lax.cumsum``/``cummax``/``cummin``/``cumlogsumexp`` of a ``[C]`` vector, XLA's
   associative-scan tree; GPU: Triton's ``tt.scan`` for cumsum, and a sequential left-to-right loop
   over the chunk's elements for max/min/logsumexp, which Triton has no scan for).
3. Carry: ``out[j*C + l] = combine(carry_j, scan_j[l])`` with ``combine`` = ``+``, ``max``, ``min``
   or ``logaddexp``; ``carry_0`` is the identity and ``carry_{j+1}`` is the float32 value at lane
   ``C - 1`` of chunk ``j`` (i.e. the last output of the chunk before rounding). Carries are thus
   applied in ascending chunk order.
4. Results are rounded once to the output dtype.

Prefix property: the output at column ``i`` depends only on columns ``<= i`` and on ``C``, and an
inclusive scan's lane ``l`` never reads lanes ``> l``; so the scan of a prefix ``x[:, :n]`` equals
the first ``n`` columns of the scan of ``x``, bitwise. ``reverse=True`` scans the reversed row
(suffix property).

``scan_reference`` restates the interpret semantics in plain JAX (same bits on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels._rows import acc_dtype_for, call_row_kernel

#: Chunk width of the scan kernels (the unit of the in-chunk scan and of the carry).
SCAN_CHUNK = 256

OPS = ("sum", "max", "min", "logsumexp")


def _identity(op):
    return {"sum": 0.0, "max": -jnp.inf, "min": jnp.inf, "logsumexp": -jnp.inf}[op]


def _combine(op, a, b):
    if op == "sum":
        return a + b
    if op in ("max", "min"):
        # NaN propagates explicitly: the GPU's max/min instructions drop NaN (IEEE maxNum).
        m = jnp.maximum(a, b) if op == "max" else jnp.minimum(a, b)
        return jnp.where((a != a) | (b != b), jnp.asarray(jnp.nan, m.dtype), m)
    return jnp.logaddexp(a, b)


def _chunk_scan(op, v):
    """Inclusive scan of a [C] vector (interpret / XLA semantics)."""
    if op == "sum":
        return lax.cumsum(v, axis=0)
    if op == "max":
        return lax.cummax(v, axis=0)
    if op == "min":
        return lax.cummin(v, axis=0)
    return lax.cumlogsumexp(v, axis=0)


def _last_lane(op, v):
    """v[C-1] as a scalar, via a masked reduction (Triton cannot index a vector)."""
    lane = jnp.arange(SCAN_CHUNK)
    ident = jnp.asarray(_identity(op), v.dtype)
    if op == "sum":
        return jnp.sum(jnp.where(lane == SCAN_CHUNK - 1, v, ident))
    if op == "min":
        return jnp.min(jnp.where(lane == SCAN_CHUNK - 1, v, ident))
    return jnp.max(jnp.where(lane == SCAN_CHUNK - 1, v, ident))


def _scan_kernel(x_ref, o_ref, *, op, n, acc_dtype, sequential):
    from jax.experimental.pallas import triton as plgpu
    ident = _identity(op)
    nchunks = _backend.opaque_trip_count(pl.cdiv(n, SCAN_CHUNK))

    if sequential:  # GPU max/min/logsumexp: element by element, left to right
        def body(i, carry):
            idx = i + jnp.arange(1)
            v = plgpu.load(x_ref.at[idx]).astype(acc_dtype)
            carry = _combine(op, carry, v)
            plgpu.store(o_ref.at[idx], carry.astype(o_ref.dtype))
            return carry
        lax.fori_loop(0, _backend.opaque_trip_count(n), body, jnp.full((1,), ident, acc_dtype))
        return

    def body(j, carry):
        idx = j * SCAN_CHUNK + jnp.arange(SCAN_CHUNK)
        mask = idx < n
        v = plgpu.load(x_ref.at[idx], mask=mask, other=0)
        v = jnp.where(mask, v.astype(acc_dtype), jnp.asarray(ident, acc_dtype))
        y = _combine(op, carry, _chunk_scan(op, v))
        plgpu.store(o_ref.at[idx], y.astype(o_ref.dtype), mask=mask)
        return _last_lane(op, y)
    lax.fori_loop(0, nchunks, body, jnp.asarray(ident, acc_dtype))


def row_scan(x, op: str, *, reverse: bool = False, out_dtype=None, backend=None):
    """Inclusive fixed-order scan of every row of ``x: [R, N]`` (``op`` in ``OPS``).

    Returns ``[R, N]`` in ``out_dtype`` (default ``x.dtype``). Inputs must be validated by the caller.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {OPS}")
    be = _backend.resolve(backend)
    R, N = x.shape
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if R == 0 or N == 0:
        return jnp.zeros((R, N), out_dtype)
    if reverse:
        x = x[:, ::-1]
    kernel = functools.partial(_scan_kernel, op=op, n=N, acc_dtype=acc_dtype_for(x.dtype),
                               sequential=(be == "gpu" and op != "sum"))
    out = call_row_kernel(kernel, x, name=f"detjax_scan_{op}", out_dtype=out_dtype,
                          elementwise=True, backend=be)
    return out[:, ::-1] if reverse else out


def scan_reference(x, op: str, *, reverse: bool = False, out_dtype=None):
    """Plain-JAX restatement of the interpret-mode scan order (same bits on CPU)."""
    R, N = x.shape
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if R == 0 or N == 0:
        return jnp.zeros((R, N), out_dtype)
    if reverse:
        x = x[:, ::-1]
    acc = acc_dtype_for(x.dtype)
    nc = -(-N // SCAN_CHUNK)
    xp = jnp.pad(x.astype(acc), ((0, 0), (0, nc * SCAN_CHUNK - N)), constant_values=_identity(op))
    xp = xp.reshape(R, nc, SCAN_CHUNK)
    carry = jnp.full((R,), _identity(op), acc)
    outs = []
    for j in range(nc):
        y = _combine(op, carry[:, None], jax.vmap(functools.partial(_chunk_scan, op))(xp[:, j]))
        outs.append(y)
        carry = y[:, -1]
    out = jnp.concatenate(outs, axis=1)[:, :N].astype(out_dtype)
    return out[:, ::-1] if reverse else out
