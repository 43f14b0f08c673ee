"""Argument checking shared by the public ops: every error names the argument and the shapes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as _backend

_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_array(x, name: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    return x


def check_float_dtype(x, name: str, backend: str | None = None):
    """bf16/f16/f32 everywhere; f64 only on the interpret backend. Integers/complex: TypeError."""
    dt = jnp.dtype(x.dtype)
    if dt in _FLOATS:
        return dt
    if dt == jnp.float64 and _backend.is_interpret(_backend.resolve(backend)):
        return dt
    if dt == jnp.float64:
        raise TypeError(f"{name} has dtype float64, which detjax supports only on the interpret backend "
                        f"(shape {tuple(x.shape)}); cast to float32")
    raise TypeError(f"{name} must be a floating dtype (bfloat16, float16 or float32); "
                    f"got {dt} with shape {tuple(x.shape)}")


def check_rank(x, name: str, ranks):
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}; got shape {tuple(x.shape)} (rank {x.ndim})")


def normalize_axes(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """``axis`` (int, tuple of ints, or None for all) -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"{name} must be an int, a tuple of ints or None; got {axis!r}")
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"{name} must be an int, a tuple of ints or None; got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} repeats an axis")
    return tuple(sorted(out))
