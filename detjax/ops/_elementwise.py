"""Elementwise math that keeps its bits whatever surrounds it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["isolated"]

#: On the CPU the flattened operands are padded to a multiple of this many elements (see below).
CPU_PAD = 16


def isolated(fn, *args):
    """Evaluate the elementwise ``fn(*args)`` in an XLA fusion of its own.

    XLA fuses elementwise code with its neighbours, and on the H100 a transcendental op (``tanh``
    between two detjax kernels) was measured to give different bits for a row alone and inside a
    batch because the fusion around it changed; the same op alone, or between optimization
    barriers, was batch-invariant. Barriers on the inputs and the output keep ``fn`` a unit.

    On the CPU, XLA's code for an elementwise op also depends on the array's *size*: ``log`` of a
    ``[5]`` array differed in the last bit from ``log`` of the same value in a ``[1]`` or ``[8]``
    array (sizes 3, 5, 7 take another code path than 1, 2, 4, 8, 9, 16, ...; found by the long fuzz
    profile). There the operands are broadcast to the result's shape, flattened and padded to a
    multiple of ``CPU_PAD`` elements, so every element goes through the same vector code; the
    padding is sliced off. ``fn`` must be elementwise (its result has the broadcast shape of its
    arguments); otherwise the arguments are passed unchanged. Differentiable (barriers, pads and
    reshapes are linear).
    """
    if not callable(fn):
        raise TypeError(f"isolated: fn must be a callable (e.g. jnp.tanh), got {type(fn).__name__}")
    if not args:
        raise TypeError("isolated: give fn's array arguments after fn, e.g. isolated(jnp.tanh, x)")
    if jax.default_backend() == "cpu":
        padded = _cpu_padded(fn, args)
        if padded is not None:
            return padded
    args = [lax.optimization_barrier(a) for a in args]
    return lax.optimization_barrier(fn(*args))


def _cpu_padded(fn, args):
    arrs = [jnp.asarray(a) for a in args]
    try:
        shape = jnp.broadcast_shapes(*[a.shape for a in arrs])
        out = jax.eval_shape(fn, *arrs)
    except Exception:  # noqa: BLE001 - not a plain elementwise function: no padding
        return None
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != shape:
        return None
    n = math.prod(shape)
    if n == 0:
        return None
    npad = -(-n // CPU_PAD) * CPU_PAD
    flat = [jnp.broadcast_to(a, shape).reshape(n) for a in arrs]
    if npad != n:
        flat = [jnp.pad(f, (0, npad - n), mode="edge") for f in flat]
    # [rows, CPU_PAD]: XLA:CPU vectorises along the minor dimension and splits work between threads
    # along the major one, so with a minor dimension of exactly CPU_PAD no element is ever in a
    # scalar tail (a flat 1-D array was seen split at sizes that left tails).
    flat = [lax.optimization_barrier(f.reshape(npad // CPU_PAD, CPU_PAD)) for f in flat]
    y = lax.optimization_barrier(fn(*flat))
    return y.reshape(npad)[:n].reshape(shape)
