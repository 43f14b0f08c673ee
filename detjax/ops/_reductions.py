"""Public reductions over any axis: ``sum``, ``mean``, ``max``, ``min``, ``argmax``, ``argmin``,
``logsumexp``, ``softmax``, ``log_softmax``, ``rms_norm``.

The reduced axes are moved last and flattened, every other axis becomes a row, and each row is
reduced by ``pallas_kernels.reductions.row_reduce`` (one program per row, chunks of 1024 lanes from
column 0, one fixed lane tree). Gradients are ``jax.custom_vjp`` rules whose own sums run on the same
kernels: run-to-run deterministic.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from detjax.ops._checks import check_array, check_float_dtype, check_rank, normalize_axes
from detjax.ops._elementwise import seal_bwd
from pallas_kernels import backend as _backend
from pallas_kernels.reductions import row_reduce

__all__ = ["sum", "mean", "max", "min", "argmax", "argmin", "logsumexp", "softmax",
           "log_softmax", "rms_norm"]


# ---------------------------------------------------------------------------------------------
# Rows: move reduced axes last and flatten.

def _to_rows(x, axes):
    keep = tuple(d for d in range(x.ndim) if d not in axes)
    xt = jnp.transpose(x, keep + axes)
    kept_shape = tuple(x.shape[d] for d in keep)
    n = math.prod(x.shape[d] for d in axes)
    return xt.reshape(math.prod(kept_shape), n), kept_shape, keep + axes


def _from_rows_full(y, x_shape, perm):
    """Inverse of _to_rows for elementwise outputs ([R, N] -> x's shape)."""
    inv = np.argsort(perm)
    return jnp.transpose(y.reshape(tuple(x_shape[d] for d in perm)), tuple(inv))


def _finish(r, kept_shape, x_ndim, axes, keepdims):
    r = r.reshape(kept_shape)
    if keepdims:
        r = jnp.expand_dims(r, axes)
    return r


def _row_op(x, op, axes, out_dtype, backend, **kw):
    rows, kept_shape, perm = _to_rows(x, axes)
    if rows.shape[0] == 0:
        y = jnp.zeros(rows.shape if op in ("softmax", "log_softmax") else rows.shape[:1], out_dtype)
    else:
        y = row_reduce(rows, op, out_dtype=out_dtype, backend=backend, **kw)
    if op in ("softmax", "log_softmax"):
        return _from_rows_full(y, x.shape, perm)
    return y.reshape(kept_shape)


def _prep(x, name, axis, backend):
    x = check_array(x, name)
    check_float_dtype(x, name, backend)
    axes = normalize_axes(axis, x.ndim)
    return x, axes, _backend.resolve(backend)


def _expand(r, x_shape, axes):
    """Broadcast a reduced result (axes removed) back to x's shape."""
    return jnp.broadcast_to(jnp.expand_dims(r, axes), x_shape)


# ---------------------------------------------------------------------------------------------
# sum / mean

def _sum(x, axes, out_dtype, backend):
    """Differentiable fixed-order sum. ``out_dtype`` is a dtype name (static, hashable)."""
    return _sum_vjp(x, axes, out_dtype, backend, tuple(x.shape), jnp.dtype(x.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _sum_vjp(x, axes, out_dtype, backend, x_shape, x_dtype):
    out_dtype = jnp.dtype(out_dtype)
    if math.prod(x.shape[d] for d in axes) == 0:
        return jnp.zeros(tuple(s for d, s in enumerate(x.shape) if d not in axes), out_dtype)
    return _row_op(x, "sum", axes, out_dtype, backend)


def _sum_fwd(x, axes, out_dtype, backend, x_shape, x_dtype):
    return _sum_vjp(x, axes, out_dtype, backend, x_shape, x_dtype), None


@seal_bwd
def _sum_bwd(axes, out_dtype, backend, x_shape, x_dtype, _, g):
    return (_expand(g, x_shape, axes).astype(x_dtype),)


_sum_vjp.defvjp(_sum_fwd, _sum_bwd)


def sum(x, axis=-1, keepdims=False, dtype=None, where=None, *, backend=None):
    """Fixed-order sum over ``axis`` (int, tuple or None for all). Accumulates in float32."""
    x, axes, be = _prep(x, "x", axis, backend)
    if where is not None:
        x = jnp.where(where, x, jnp.zeros((), x.dtype))
    out_dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
    r = _sum(x, axes, out_dtype.name, be)
    return jnp.expand_dims(r, axes) if keepdims else r


def _mean_kernel(x, axes, out_dtype, backend):
    """Differentiable row mean with the division inside the kernel (dtype name static)."""
    return _mean_vjp(x, axes, out_dtype, backend, tuple(x.shape), jnp.dtype(x.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _mean_vjp(x, axes, out_dtype, backend, x_shape, x_dtype):
    return _row_op(x, "mean", axes, jnp.dtype(out_dtype), backend)


def _mean_fwd(x, axes, out_dtype, backend, x_shape, x_dtype):
    return _mean_vjp(x, axes, out_dtype, backend, x_shape, x_dtype), None


@seal_bwd
def _mean_bwd(axes, out_dtype, backend, x_shape, x_dtype, _, g):
    n = math.prod(x_shape[d] for d in axes)
    return ((_expand(g.astype(jnp.float32), x_shape, axes) / n).astype(x_dtype),)


_mean_vjp.defvjp(_mean_fwd, _mean_bwd)


def mean(x, axis=-1, keepdims=False, dtype=None, where=None, *, backend=None):
    """Fixed-order ``sum / count`` in float32. Without ``where`` the division happens inside the
    kernel (XLA's CPU compiler was seen to round a separate division differently for one row);
    with ``where`` it is ``sum(selected) / count(selected)``."""
    x, axes, be = _prep(x, "x", axis, backend)
    out_dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    if where is None:
        if math.prod(x.shape[d] for d in axes) == 0:
            r = jnp.full(tuple(s for d, s in enumerate(x.shape) if d not in axes), jnp.nan, out_dtype)
        else:
            r = _mean_kernel(x, axes, out_dtype.name, be)
        return jnp.expand_dims(r, axes) if keepdims else r
    s = sum(x, axes, keepdims=keepdims, dtype=acc, where=where, backend=be)
    n = jnp.sum(jnp.broadcast_to(where, x.shape), axis=axes, keepdims=keepdims, dtype=jnp.int32)
    return (s / n.astype(acc)).astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# max / min / argmax / argmin

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max(x, axes, backend):
    return _row_op(x, "max", axes, x.dtype, backend)


def _max_fwd(x, axes, backend):
    m = _max(x, axes, backend)
    return m, (x, m)


@seal_bwd
def _max_bwd(axes, backend, res, g):
    x, m = res
    hit = (x == _expand(m, x.shape, axes))
    count = _sum(hit.astype(jnp.float32), axes, "float32", backend)  # integer-valued: exact
    w = hit.astype(jnp.float32) / _expand(count, x.shape, axes)
    return ((w * _expand(g.astype(jnp.float32), x.shape, axes)).astype(x.dtype),)


_max.defvjp(_max_fwd, _max_bwd)


def max(x, axis=-1, keepdims=False, where=None, initial=None, *, backend=None):
    """Maximum over ``axis``. Exact; the fixed tree also fixes which of +0/-0 wins. Ties share the
    gradient equally (like ``jnp.max``)."""
    x, axes, be = _prep(x, "x", axis, backend)
    if math.prod(x.shape[d] for d in axes) == 0 and initial is None:
        raise ValueError(f"max of an empty axis {axis!r} (shape {tuple(x.shape)}) has no identity; "
                         "pass initial=")
    if where is not None:
        if initial is None:
            raise ValueError("max(where=...) needs initial= (like jnp.max)")
        x = jnp.where(where, x, jnp.asarray(-jnp.inf, x.dtype))
    r = _max(x, axes, be)
    if initial is not None:
        r = jnp.maximum(r, jnp.asarray(initial, x.dtype))
    return jnp.expand_dims(r, axes) if keepdims else r


def min(x, axis=-1, keepdims=False, where=None, initial=None, *, backend=None):
    """Minimum over ``axis`` as ``-max(-x)`` (exact)."""
    x = check_array(x, "x")
    neg_initial = None if initial is None else -initial
    return -max(-x, axis, keepdims, where, neg_initial, backend=backend)


def _arg_best(x, axis, keepdims, backend, sign):
    x = check_array(x, "x")
    check_float_dtype(x, "x", backend)
    flat_keepdims_shape = (1,) * x.ndim if (axis is None and keepdims) else None
    if axis is None:
        x, axis = x.reshape(-1), 0
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int or None; got {axis!r}")
    (ax,) = normalize_axes(axis, x.ndim)
    if x.shape[ax] == 0:
        raise ValueError(f"arg{'max' if sign > 0 else 'min'} of an empty axis {axis} "
                         f"(shape {tuple(x.shape)})")
    xs = x if sign > 0 else -x
    m = max(xs, ax, keepdims=True, backend=backend)
    nan_row = jnp.any(jnp.isnan(x), axis=ax, keepdims=True)
    hit = jnp.where(nan_row, jnp.isnan(x), xs == m)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, ax)
    # First hit: an integer minimum, exact whatever the order.
    idx = jnp.min(jnp.where(hit, iota, x.shape[ax]), axis=ax, keepdims=keepdims)
    return idx if flat_keepdims_shape is None else idx.reshape(flat_keepdims_shape)


def argmax(x, axis=-1, keepdims=False, *, backend=None):
    """Index of the first maximum (first NaN if any), like ``jnp.argmax``."""
    return _arg_best(x, axis, keepdims, backend, +1)


def argmin(x, axis=-1, keepdims=False, *, backend=None):
    """Index of the first minimum (first NaN if any), like ``jnp.argmin``."""
    return _arg_best(x, axis, keepdims, backend, -1)


# ---------------------------------------------------------------------------------------------
# logsumexp / softmax / log_softmax

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _logsumexp(x, axes, backend):
    return _row_op(x, "logsumexp", axes, x.dtype, backend)


def _lse_fwd(x, axes, backend):
    return _logsumexp(x, axes, backend), x


@seal_bwd
def _lse_bwd(axes, backend, x, g):
    p = _row_op(x, "softmax", axes, jnp.float32, backend)
    return ((p * _expand(g.astype(jnp.float32), x.shape, axes)).astype(x.dtype),)


_logsumexp.defvjp(_lse_fwd, _lse_bwd)


def logsumexp(x, axis=-1, keepdims=False, where=None, *, backend=None):
    """``log(sum(exp(x)))`` over ``axis``, stabilised by the (exact) max; float32 inside."""
    x, axes, be = _prep(x, "x", axis, backend)
    if where is not None:
        x = jnp.where(where, x, jnp.asarray(-jnp.inf, x.dtype))
    if math.prod(x.shape[d] for d in axes) == 0:
        r = jnp.full(tuple(s for d, s in enumerate(x.shape) if d not in axes), -jnp.inf, x.dtype)
    else:
        r = _logsumexp(x, axes, be)
    return jnp.expand_dims(r, axes) if keepdims else r


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax(x, axes, backend):
    return _row_op(x, "softmax", axes, x.dtype, backend)


def _softmax_fwd(x, axes, backend):
    y = _softmax(x, axes, backend)
    return y, y


@seal_bwd
def _softmax_bwd(axes, backend, y, g):
    yf, gf = y.astype(jnp.float32), g.astype(jnp.float32)
    s = _sum(gf * yf, axes, "float32", backend)
    return ((yf * (gf - _expand(s, y.shape, axes))).astype(y.dtype),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _log_softmax(x, axes, backend):
    return _row_op(x, "log_softmax", axes, x.dtype, backend)


def _log_softmax_fwd(x, axes, backend):
    y = _log_softmax(x, axes, backend)
    return y, y


@seal_bwd
def _log_softmax_bwd(axes, backend, y, g):
    gf = g.astype(jnp.float32)
    s = _sum(gf, axes, "float32", backend)
    return ((gf - jnp.exp(y.astype(jnp.float32)) * _expand(s, y.shape, axes)).astype(y.dtype),)


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def _masked_softmax(fn, x, axis, where, backend, fill):
    x, axes, be = _prep(x, "x", axis, backend)
    if math.prod(x.shape[d] for d in axes) == 0:
        return x
    if where is not None:
        x = jnp.where(where, x, jnp.asarray(-jnp.inf, x.dtype))
    y = fn(x, axes, be)
    if where is not None:
        y = jnp.where(where, y, jnp.asarray(fill, y.dtype))
    return y


def softmax(x, axis=-1, where=None, *, backend=None):
    """``exp(x - max) * (1 / sum(exp(x - max)))`` over ``axis``; masked entries (``where``) give 0.
    A row whose entries are all -inf gives NaN, like ``jax.nn.softmax``."""
    return _masked_softmax(_softmax, x, axis, where, backend, 0.0)


def log_softmax(x, axis=-1, where=None, *, backend=None):
    """``(x - max) - log(sum(exp(x - max)))`` over ``axis``; masked entries give -inf."""
    return _masked_softmax(_log_softmax, x, axis, where, backend, -jnp.inf)


# ---------------------------------------------------------------------------------------------
# RMSNorm

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms_norm(x2, scale, eps, offset, backend):
    return row_reduce(x2, "rms_norm", weight=scale, eps=eps, offset=offset, backend=backend)


def _rms_fwd(x2, scale, eps, offset, backend):
    return _rms_norm(x2, scale, eps, offset, backend), (x2, scale)


@seal_bwd
def _rms_bwd(eps, offset, backend, res, g):
    x2, scale = res
    xf, gf = x2.astype(jnp.float32), g.astype(jnp.float32)
    n = x2.shape[1]
    ss = row_reduce(xf * xf, "sum", out_dtype=jnp.float32, backend=backend)
    r = jax.lax.rsqrt(ss / n + eps)[:, None]
    xhat = xf * r
    w = offset + scale.astype(jnp.float32)
    gw = gf * w
    c = row_reduce(gw * xhat, "sum", out_dtype=jnp.float32, backend=backend)[:, None] / n
    dx = r * (gw - xhat * c)
    # d scale = sum over rows of g * xhat: a column sum, as rows of the transpose.
    dscale = row_reduce(jnp.transpose(gf * xhat), "sum", out_dtype=jnp.float32, backend=backend)
    return dx.astype(x2.dtype), dscale.astype(scale.dtype)


_rms_norm.defvjp(_rms_fwd, _rms_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rms_norm_res(x2, scale, res, eps, offset, backend):
    return row_reduce(x2, "rms_norm", weight=scale, eps=eps, offset=offset, backend=backend,
                      residual=res)


def _rms_res_fwd(x2, scale, res, eps, offset, backend):
    return _rms_norm_res(x2, scale, res, eps, offset, backend), (x2, scale)


def _rms_res_bwd(eps, offset, backend, res, g):
    dx, dscale = _rms_bwd(eps, offset, backend, res, g)
    return dx, dscale, g


_rms_norm_res.defvjp(_rms_res_fwd, _rms_res_bwd)


def rms_norm(x, scale, *, eps=1e-6, offset=1.0, residual=None, backend=None):
    """RMSNorm over the last axis: ``x * rsqrt(mean(x^2) + eps) * (offset + scale)`` in float32,
    rounded to ``x.dtype``. Gemma uses ``offset=1`` (scale stored as a delta from 1).

    ``residual``: an array of ``x``'s shape and dtype; the result is then ``residual + y`` (the
    rounded norm added in float32 and rounded once more: bitwise what ``residual + rms_norm(x)``
    gives); for bf16/f16 in the same kernel (a Gemma block's ``x + post_norm(a)`` in one pass),
    for float32 as a separate add (in one kernel the compiler may contract the norm's last multiply
    and the add into an FMA)."""
    x = check_array(x, "x")
    scale = check_array(scale, "scale")
    check_float_dtype(x, "x", backend)
    check_float_dtype(scale, "scale", backend)
    if x.ndim < 1:
        raise ValueError(f"rms_norm: x must have rank >= 1; got shape {tuple(x.shape)}")
    check_rank(scale, "scale", (1,))
    if scale.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: scale has shape {tuple(scale.shape)} but x's last axis has size "
                         f"{x.shape[-1]} (x shape {tuple(x.shape)})")
    if not isinstance(eps, numbers.Real) or isinstance(eps, (bool, np.bool_)) or not eps > 0:
        raise ValueError(f"rms_norm: eps must be a positive number; got {eps!r}")
    if not isinstance(offset, numbers.Real) or isinstance(offset, (bool, np.bool_)):
        raise TypeError(f"rms_norm: offset must be a number; got {offset!r}")
    if residual is not None:
        residual = check_array(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)} and dtype "
                             f"{x.dtype}; got {tuple(residual.shape)} {residual.dtype}")
    if x.shape[-1] == 0 or x.size == 0:
        return x if residual is None else residual
    be = _backend.resolve(backend)
    x2 = x.reshape(-1, x.shape[-1])
    if residual is None:
        y = _rms_norm(x2, scale, float(eps), float(offset), be)
    elif x.dtype.itemsize != 2:
        y = residual.reshape(x2.shape) + _rms_norm(x2, scale, float(eps), float(offset), be)
    else:
        y = _rms_norm_res(x2, scale, residual.reshape(x2.shape), float(eps), float(offset), be)
    return y.reshape(x.shape)


