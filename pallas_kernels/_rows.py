"""Shared launcher for the one-program-per-row kernels (reductions, scans).

Every row kernel runs on a grid over rows, sees one row as a 1-D ref, and is compiled once per row
length. The launcher pads the row stride to a multiple of 16 bytes: Triton picks a row's register
layout (and so the shape of any in-register tree) from the pointers' alignment, which was measured
on the H100 to give different bits for N=1000 and N=1025. Padded columns are never read as data
(kernels mask by the true length ``n``) and are sliced off the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

GPU_NUM_WARPS = 4


def round_up(x: int, k: int) -> int:
    return (x + k - 1) // k * k


def masked_load(ref, mask, gpu, fill=0):
    """``ref[...]`` with the elements outside ``mask`` (broadcast to the block) read as ``fill``.
    On the GPU a masked load, which never touches memory past the array (a block may overhang it);
    in interpret mode (where Pallas pads an overhanging block with its own fill value) a select."""
    if mask is None:
        return ref[...]
    mask = jnp.broadcast_to(mask, ref.shape)
    if gpu:
        from jax.experimental.pallas import triton as pltriton
        return pltriton.load(ref, mask=mask, other=fill)
    return jnp.where(mask, ref[...], jnp.asarray(fill, ref.dtype))


def masked_store(ref, value, mask, gpu):
    """Store the elements inside ``mask`` (broadcast to the block; on the GPU a masked store;
    interpret mode drops the part of an overhanging block itself)."""
    if mask is None or not gpu:
        ref[...] = value
        return
    from jax.experimental.pallas import triton as pltriton
    pltriton.store(ref, value, mask=jnp.broadcast_to(mask, ref.shape))


def acc_dtype_for(dtype):
    """float32 accumulation (float64 for float64 inputs, interpret backend only)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def call_row_kernel(kernel, x, *, name, out_dtype, elementwise, backend, shared=(), rows=()):
    """Run ``kernel(x_row_ref, *shared_refs, *row_refs, o_ref)`` once per row of ``x: [R, N]``.

    ``shared``: 1-D ``[N]`` inputs given whole to every program (e.g. RMSNorm's scale).
    ``rows``: further ``[R, N]`` inputs, one row per program like ``x`` (e.g. a residual).
    Returns ``[R, N]`` when ``elementwise`` else ``[R]`` (the kernel writes a ``[1]`` output).
    ``backend`` must be a resolved GPU or interpret backend.
    """
    if backend in ("tpu", "tpu-interpret"):
        raise NotImplementedError(f"backend {backend!r}: the TPU lowering of {name} is not implemented yet")
    R, N = x.shape
    Ns = round_up(N, 16 // jnp.dtype(x.dtype).itemsize)
    if Ns != N:
        x = jnp.pad(x, ((0, 0), (0, Ns - N)))
        shared = tuple(jnp.pad(s, (0, Ns - N)) for s in shared)
        rows = tuple(jnp.pad(r, ((0, 0), (0, Ns - N))) for r in rows)
    row_spec = pl.BlockSpec((None, Ns), lambda r: (r, 0))
    if elementwise:
        out_shape, out_spec = jax.ShapeDtypeStruct((R, Ns), out_dtype), row_spec
    else:  # one scalar per row, stored as a [R, 1] column
        out_shape = jax.ShapeDtypeStruct((R, 1), out_dtype)
        out_spec = pl.BlockSpec((None, 1), lambda r: (r, 0))
    compiler_params = None
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        compiler_params = pltriton.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=1)
    out = pl.pallas_call(
        kernel,
        grid=(R,),
        in_specs=[row_spec] + [pl.BlockSpec((Ns,), lambda r: (0,)) for _ in shared]
        + [row_spec for _ in rows],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=_backend.interpret_arg(backend),
        compiler_params=compiler_params,
        name=name,
    )(x, *shared, *rows)
    if elementwise:
        return out[:, :N] if Ns != N else out
    return out[:, 0]
