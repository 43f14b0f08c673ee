"""Elementwise math that keeps its bits whatever surrounds it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["isolated", "seal_bwd"]

#: On the CPU the flattened operands are padded to a multiple of this many elements (see below).
CPU_PAD = 16


def isolated(fn, *args, consts=()):
    """Evaluate the elementwise ``fn(*args, *consts)`` in an XLA fusion of its own.

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
    reshapes are linear). With arguments of one shape and float dtypes the backward pass is
    isolated the same way (``custom_vjp``): the derivative's elementwise code gets its own fusion
    too. Forward-mode autodiff then is not available, as for the other ops.

    ``consts``: further arrays ``fn`` reads as constants (``stop_gradient``: their cotangent is
    zero), of any shape that broadcasts against the arguments, e.g. RoPE's ``cos``/``sin`` of shape
    ``[B, T, 1, H/2]`` for ``x: [B, T, N, H]``: they enter the fusion as they are, so a broadcast
    is never written to memory. They do not count for the one-shape rule of the isolated backward.
    """
    if not callable(fn):
        raise TypeError(f"isolated: fn must be a callable (e.g. jnp.tanh), got {type(fn).__name__}")
    if not args:
        raise TypeError("isolated: give fn's array arguments after fn, e.g. isolated(jnp.tanh, x)")
    arrs = [jnp.asarray(a) for a in args]
    consts = tuple(lax.stop_gradient(jnp.asarray(c)) for c in consts)
    if (len({a.shape for a in arrs}) == 1
            and all(jnp.issubdtype(a.dtype, jnp.floating) for a in arrs)):
        return _isolated_vjp(fn, len(consts), *arrs, *consts)
    return _isolated_eval(fn, tuple(args) + consts)


def _isolated_eval(fn, args):
    if jax.default_backend() == "cpu":
        padded = _cpu_padded(fn, args)
        if padded is not None:
            return padded
    args = [lax.optimization_barrier(a) for a in args]
    return lax.optimization_barrier(fn(*args))


def _isolated_vjp(fn, nconsts, *args):
    """``isolated`` whose backward is isolated too. Autodiff would otherwise leave the derivative's
    elementwise code (``gelu'``, ``1 - tanh^2``, the rotation of RoPE) to XLA's fusion with its
    neighbours, and XLA:GPU contracts a multiply and an add that share a fusion into one FMA, so
    the bits could depend on the surrounding program (one device vs a tensor-parallel shard).
    Each argument's cotangent is evaluated by ``_isolated_eval`` (barriers, CPU padding). The last
    ``nconsts`` arguments are constants: their cotangent is zero."""
    n = len(args) - nconsts

    @jax.custom_vjp
    def run(*a):
        return _isolated_eval(fn, a)

    def run_fwd(*a):
        return run(*a), a

    def run_bwd(a, g):
        leaves, tree = jax.tree.flatten(g)

        def cot(i):
            def f(*ag):
                c = ag[n:n + nconsts]
                _, pull = jax.vjp(lambda *x: fn(*x, *c), *ag[:n])
                return pull(jax.tree.unflatten(tree, list(ag[n + nconsts:])))[i]
            return _isolated_eval(f, tuple(a) + tuple(leaves))
        return (tuple(cot(i) for i in range(n))
                + tuple(jnp.zeros_like(c) for c in a[n:]))

    run.defvjp(run_fwd, run_bwd)
    return run(*args)


def seal_bwd(bwd):
    """Decorator for a ``custom_vjp`` backward rule ``bwd(*nondiff, res, g)``: its residuals and
    cotangent enter, and its results leave, through optimization barriers, so its elementwise code
    forms fusions of its own, the same in every program (a single device, a tensor-parallel shard,
    a decode loop). Without it XLA may fuse e.g. ``g - exp(y) * s`` with different neighbours in
    different programs, and XLA:GPU contracts a multiply-add that shares a fusion into one FMA.
    (On two H200s tensor-parallel gradients were 1 ulp off one device in some processes; the seal
    removes this possible cause, it was not shown to be the only one: README, "Several devices".)"""
    @functools.wraps(bwd)
    def sealed(*args):
        *static, res, g = args
        res, g = lax.optimization_barrier((res, g))
        return lax.optimization_barrier(bwd(*static, res, g))
    return sealed


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
