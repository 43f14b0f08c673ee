"""Mosaic GPU matmul for few rows (Hopper): the default path's kernel for some decode shapes.

Reduction order: the one of ``pallas_kernels/matmul.py`` (see ``order.py``): ``K`` in tiles from
k = 0, ascending, one f32 accumulator per output element, the tile product being the tensor core's
16-wide k-steps in ascending k (here ``wgmma``, which the Triton kernel also issues for 64-row
tiles). No split-K. So it gives the Triton kernel's bits: on an H200 (session 13, runs s13-2 and
s13-3) at 186 of 186 tile/shape pairs, bf16 and f16, M = 1, 7, 8, 33, 64, N tiles 16 to 128, K
tiles 64 to 256, 3 to 8 pipeline slots; ``tests/test_matmul_mgpu.py::test_gpu_mosaic_matmul_
gives_the_triton_bits`` keeps checking it. A TMA-fed, warp-specialized pipeline (one compute
warpgroup of 64 rows, one memory warpgroup, one CTA per ``tile_n`` output columns) reads wide or
deep weights faster than the Triton kernel at 16 < M <= 64 (``mgpu_tile_for`` has the measured
rule), so ``matmul_kernel_call`` and ``grouped_matmul_call`` dispatch those shapes here on Hopper
GPUs (``matmul._mosaic_rows``, which also keeps ``jax.vmap`` from batching the kernel). The
dispatch is by shape only, and every choice gives the same bits.

Shapes: ``a [Mp, K]`` with ``Mp`` a multiple of 64, ``b [K, N]`` with ``N`` a multiple of
``tile_n`` and ``K`` a multiple of ``tile_k`` (``matmul`` pads ``a``'s rows and slices them off).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_M = 64
_SEMANTICS = plgpu.LoweringSemantics.Lane

#: ``DETJAX_MOSAIC_MATMUL=0`` keeps every matmul on the Triton kernel (same bits; for comparisons).
ENABLED = os.environ.get("DETJAX_MOSAIC_MATMUL", "1") != "0"


@dataclasses.dataclass(frozen=True)
class MgpuTile:
    tile_n: int
    tile_k: int
    steps: int


#: Rows the dispatch takes: MIN_M < M <= TILE_M. H200 (s13-3, s13-4, s13-5): at M = 8 the kernel
#: alone beats the Triton one on wide weights (up projection 13.5 vs 16.1 us), but in gemma2_2b
#: generation at batch 8 the per-call row pad and slice and one launch per weight (the Triton kernel
#: does gate and up in one) cost more than that: 0.98 s vs 0.92 s with the Triton attention, 0.84
#: vs 0.79 s with the Mosaic one. At batch 64 generation got faster (1.037 vs 1.053 s, bitwise the
#: same logprobs).
MIN_M = 16
#: Wide weights (N >= WIDE_MIN_N): 128 x 128 tiles, 4 slots. H200, bf16, gemma2_2b up projection
#: (K 2304, N 9216), with the row pad/slice, M = 64: 12.9 us vs Triton 20.1 (XLA 23.1) (s13-3).
WIDE = MgpuTile(128, 128, 4)
WIDE_MIN_N = 6144
#: Deep weights (K >= DEEP_MIN_K): 64 x 256 tiles, 3 slots. gemma2_2b down projection (K 9216,
#: N 2304), M = 64: 21.5 us vs Triton 26.5 (XLA 21.7); at M <= 8 it only ties the Triton kernel
#: (22.2 vs 22.0 us) (s13-3).
DEEP = MgpuTile(64, 256, 3)
DEEP_MIN_K = 8192


def mgpu_tile_for(m: int, h: int, n: int, k: int, dtype) -> MgpuTile | None:
    """The Mosaic tile for ``[m, k] x [k, n]`` (a weight of ``n`` columns in groups of ``h``), or
    ``None`` where the Triton kernel is as fast (M <= 16) or the shape is not measured (M > 64,
    float32, K not a multiple of the K tile, H not a multiple of the N tile). Same bits either
    way."""
    if not ENABLED or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    if not MIN_M < m <= TILE_M:
        return None
    if n >= WIDE_MIN_N and h % WIDE.tile_n == 0 and k % WIDE.tile_k == 0:
        return WIDE
    if k >= DEEP_MIN_K and h % DEEP.tile_n == 0 and k % DEEP.tile_k == 0:
        return DEEP
    return None


@functools.lru_cache(maxsize=None)
def hopper_available() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x: wgmma)."""
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
    except Exception:  # noqa: BLE001 - no device query: take the Triton kernel
        return False


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


def matmul(a, b, *, tile: MgpuTile | None = None, **kw):
    """``[M, K] x [K, N]`` (or ``[G, K, H]``) for any ``M``: rows padded to a multiple of 64, then
    sliced off (padding rows never meet real ones: wgmma rows are independent). ``tile``: an
    ``MgpuTile`` (or pass ``tile_n``/``tile_k``/``steps``)."""
    if tile is not None:
        kw = dict(tile_n=tile.tile_n, tile_k=tile.tile_k, steps=tile.steps, **kw)
    m = a.shape[0]
    mp = -(-m // TILE_M) * TILE_M
    ap = a if mp == m else jnp.pad(a, ((0, mp - m), (0, 0)))
    return mgpu_matmul_call(ap, b, **kw)[:m]
