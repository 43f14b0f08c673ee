"""Mosaic GPU matmul for few rows (Hopper; experimental, measured against the Triton kernel).

Reduction order: the one of ``pallas_kernels/matmul.py`` (see ``order.py``): ``K`` in tiles from
k = 0, ascending, one f32 accumulator per output element, the tile product being the tensor core's
16-wide k-steps in ascending k (here ``wgmma``, which the Triton kernel also issues for 64-row
tiles). No split-K. The question this kernel answers on the GPU: does a TMA-fed, warp-specialized
pipeline (one compute warpgroup of 64 rows, one memory warpgroup) give the Triton kernel's bits
and read decode-shape weights (M <= 64) closer to the copy bandwidth?

Shapes: ``a [Mp, K]`` with ``Mp`` a multiple of 64, ``b [K, N]`` with ``N`` a multiple of
``tile_n`` and ``K`` a multiple of ``tile_k`` (``matmul`` pads ``a``'s rows and slices them off).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_M = 64
_SEMANTICS = plgpu.LoweringSemantics.Lane


def _transforms(minor_elems: int, itemsize: int, swizzle: int | None = None):
    swizzle = swizzle or plgpu.find_swizzle(minor_elems * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def mgpu_matmul_call(a, b, *, tile_n: int = 64, tile_k: int = 64, steps: int = 6, out_dtype=None):
    """``a @ b`` with f32 accumulation. ``a [Mp, K]``; ``b [K, N]``, or ``[G, K, H]`` read in place
    as the ``[K, G * H]`` weight whose column ``g * H + h`` is ``b[g, :, h]`` (Gemma's head
    projections; ``H`` a multiple of ``tile_n``). Returns ``[Mp, N]`` (``N = G * H``)."""
    b3 = b if b.ndim == 3 else b[None]
    mp, k = a.shape
    g, k2, h = b3.shape
    n = g * h
    if k2 != k:
        raise ValueError(f"b must be [K, N] or [G, K, H] with K = {k}; got b.shape {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"a and b must both be bfloat16 or float16; got {a.dtype}, {b.dtype}")
    if mp % TILE_M or h % tile_n or k % tile_k:
        raise ValueError(f"need M % {TILE_M} == H % tile_n == K % tile_k == 0; got a {a.shape}, "
                         f"b {b.shape}, tile_n {tile_n}, tile_k {tile_k}")
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    isz = jnp.dtype(a.dtype).itemsize
    # wgmma needs one swizzle for both operands: the narrower of the two tiles' minor dims sets it
    swizzle = min(plgpu.find_swizzle(tile_k * isz * 8), plgpu.find_swizzle(tile_n * isz * 8))
    ta, tb = _transforms(tile_k, isz, swizzle), _transforms(tile_n, isz, swizzle)
    to = _transforms(tile_n, out_dtype.itemsize)
    k_iters = k // tile_k
    tiles_h = h // tile_n

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((TILE_M, tile_k), lambda kk: (0, kk), transforms=ta,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0), transforms=tb,
                                      memory_space=plgpu.SMEM)],
            wg_axis="wg", num_compute_wgs=1, max_concurrent_steps=steps,
            compute_context=compute_context)

    def kernel(a_gmem, b_gmem, out_gmem):
        ignore = lambda *_, **__: None

        @functools.partial(pl.run_scoped,
                           allocs=get_pipeline(ignore, ignore).get_allocations(
                               a_gmem, b_gmem.at[0]),
                           out_smem=plgpu.SMEM((TILE_M, tile_n), out_dtype, transforms=to),
                           collective_axes="wg")
        def _scope(allocs, out_smem):
            ni = lax.axis_index("n")
            mi = lax.axis_index("m")
            rows = pl.ds(mi * TILE_M, TILE_M)
            gi, hi = ni // tiles_h, lax.rem(ni, tiles_h)

            def compute_context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TILE_M, tile_n), jnp.float32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    out_smem[...] = acc_ref[...].astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[rows, pl.ds(ni * tile_n, tile_n)])
                    plgpu.wait_smem_to_gmem(0)

            def body(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                plgpu.wgmma_wait(0)
                return acc_ref

            get_pipeline(body, compute_context)(
                a_gmem.at[rows, :], b_gmem.at[gi].at[:, pl.ds(hi * tile_n, tile_n)],
                allocations=allocs)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(n // tile_n, mp // TILE_M),
        grid_names=("n", "m"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=_SEMANTICS),
    )(a, b3)


def matmul(a, b, **kw):
    """``[M, K] x [K, N]`` for any ``M``: rows padded to a multiple of 64, then sliced off."""
    m = a.shape[0]
    mp = -(-m // TILE_M) * TILE_M
    ap = a if mp == m else jnp.pad(a, ((0, mp - m), (0, 0)))
    return mgpu_matmul_call(ap, b, **kw)[:m]
