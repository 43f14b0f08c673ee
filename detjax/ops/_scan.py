"""Public cumulative ops: ``cumsum``, ``cumlogsumexp``, ``cummax``, ``cummin`` (``lax.cum*``-shaped).

The scanned axis is moved last and every other axis becomes a row of
``pallas_kernels.scan.row_scan`` (one program per row; chunks of 256 from column 0; one in-chunk
scan of fixed shape; carries in ascending chunk order). Results are batch-invariant and have the
prefix property (suffix property for ``reverse=True``).

Gradients (``jax.custom_vjp``): ``cumsum``'s is a reverse ``cumsum`` on the same kernel;
``cummax``/``cummin``/``cumlogsumexp`` differentiate ``lax.associative_scan`` of the combine
function, which is only elementwise ops and slices along the scanned axis (fixed structure for a
given length, hence deterministic and batch-invariant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detjax.ops._checks import check_array, check_float_dtype
from pallas_kernels import backend as _backend
from pallas_kernels.scan import row_scan

__all__ = ["cumsum", "cumlogsumexp", "cummax", "cummin", "cumsum_reference"]


def _norm_axis(axis, ndim):
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int; got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
    return int(axis) % ndim


def _apply_rows(x, op, axis, reverse, backend):
    xt = jnp.moveaxis(x, axis, -1)
    shp = xt.shape
    y = row_scan(xt.reshape(-1, shp[-1]), op, reverse=reverse, backend=backend)
    return jnp.moveaxis(y.reshape(shp), -1, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cumsum(x, axis, reverse, backend):
    return _apply_rows(x, "sum", axis, reverse, backend)


def _cumsum_fwd(x, axis, reverse, backend):
    return _cumsum(x, axis, reverse, backend), None


def _cumsum_bwd(axis, reverse, backend, _, g):
    return (_cumsum(g, axis, not reverse, backend),)


_cumsum.defvjp(_cumsum_fwd, _cumsum_bwd)

_COMBINE = {"max": jnp.maximum, "min": jnp.minimum, "logsumexp": jnp.logaddexp}


def _assoc_ref(x, op, axis, reverse):
    xf = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
    return lax.associative_scan(_COMBINE[op], xf, reverse=reverse, axis=axis).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _cum_other(x, op, axis, reverse, backend):
    return _apply_rows(x, op, axis, reverse, backend)


def _cum_other_fwd(x, op, axis, reverse, backend):
    return _cum_other(x, op, axis, reverse, backend), x


def _cum_other_bwd(op, axis, reverse, backend, x, g):
    _, vjp = jax.vjp(lambda v: _assoc_ref(v, op, axis, reverse), x)
    return vjp(g)


_cum_other.defvjp(_cum_other_fwd, _cum_other_bwd)


def _prep(x, axis, reverse, backend, name):
    x = check_array(x, "x")
    check_float_dtype(x, "x", backend)
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have rank >= 1; got a scalar")
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"{name}: reverse must be a bool; got {reverse!r}")
    return x, _norm_axis(axis, x.ndim), bool(reverse), _backend.resolve(backend)


def cumsum(x, axis=-1, reverse=False, *, backend=None):
    """Inclusive cumulative sum along ``axis`` (float32 accumulation, fixed chunked order)."""
    x, axis, reverse, be = _prep(x, axis, reverse, backend, "cumsum")
    if x.size == 0:
        return x
    return _cumsum(x, axis, reverse, be)


def _cum(op, name):
    def f(x, axis=-1, reverse=False, *, backend=None):
        x, axis, reverse, be = _prep(x, axis, reverse, backend, name)
        if x.size == 0:
            return x
        return _cum_other(x, op, axis, reverse, be)
    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"Inclusive ``{name}`` along ``axis`` with a fixed chunked order (see module doc)."
    return f


cumlogsumexp = _cum("logsumexp", "cumlogsumexp")
cummax = _cum("max", "cummax")
cummin = _cum("min", "cummin")


def cumsum_reference(x, axis=-1, reverse=False):
    """Plain-JAX restatement of ``cumsum``'s interpret-mode order (same bits on CPU)."""
    from pallas_kernels.scan import scan_reference
    x = jnp.asarray(x)
    axis = _norm_axis(axis, x.ndim)
    xt = jnp.moveaxis(x, axis, -1)
    y = scan_reference(xt.reshape(-1, xt.shape[-1]), "sum", reverse=reverse)
    return jnp.moveaxis(y.reshape(xt.shape), -1, axis)
