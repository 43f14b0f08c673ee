"""Elementwise math that keeps its bits whatever surrounds it."""

from __future__ import annotations

from jax import lax

__all__ = ["isolated"]


def isolated(fn, *args):
    """Evaluate the elementwise ``fn(*args)`` in an XLA fusion of its own.

    XLA fuses elementwise code with its neighbours, and on the H100 a transcendental op (``tanh``
    between two detjax kernels) was measured to give different bits for a row alone and inside a
    batch because the fusion around it changed; the same op alone, or between optimization
    barriers, was batch-invariant. Barriers on the inputs and the output keep ``fn`` a unit.
    Differentiable (the barriers are identities for autodiff).
    """
    if not callable(fn):
        raise TypeError(f"isolated: fn must be a callable (e.g. jnp.tanh), got {type(fn).__name__}")
    if not args:
        raise TypeError("isolated: give fn's array arguments after fn, e.g. isolated(jnp.tanh, x)")
    args = [lax.optimization_barrier(a) for a in args]
    return lax.optimization_barrier(fn(*args))
