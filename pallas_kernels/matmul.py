"""Batch-invariant matmul: ``[B, M, K] @ [B, K, N]`` (or ``[B, N, K]`` transposed) with a fixed K order.

Reduction order (the product; see also ``pallas_kernels/order.py``)
-------------------------------------------------------------------
* Each output element ``c[b, m, n]`` has one float32 accumulator (float64 for float64 inputs,
  interpret backend only), initialised to +0.
* ``K`` is padded with zeros to a multiple of ``MATMUL_BLOCK_K`` (= 64) and cut into tiles
  ``[t * 64, (t + 1) * 64)`` anchored at k = 0. Tiles are added to the accumulator in ascending
  ``t``, one after another, in the same program. There is no split-K, so nothing about ``M``, ``N``,
  the batch or the tile sizes in M and N changes the order. Appending zero columns to ``K`` only
  appends tiles of exact zeros, so the bits do not change (zero extension).
* Inside one tile the product is the backend's matrix instruction:
  - ``gpu`` (Pallas, Triton lowering): bf16/f16 -> tensor-core MMA with f32 accumulation, k-steps of
    16 in ascending order, accumulating into the running accumulator; f32 -> IEEE FMA chain
    (``precision='highest'``, the default) or TF32 MMA when the caller asks for ``precision='tf32'``.
    The K tile on the GPU is therefore only a pipelining unit: the bits were measured identical
    across (block_m, block_n, block_k, warps, stages) configurations
    (``tests/test_matmul.py::test_gpu_configs_bitwise_identical``), which is why the GPU wrapper
    may choose the tile by shape.
  - ``interpret``: XLA's CPU dot of one ``[INTERPRET_BLOCK_M, 64] x [64, INTERPRET_BLOCK_N]`` tile,
    rounded to f32 and added to the accumulator. XLA's CPU dot gives bits that depend on the tile's
    *shape* (measured), so interpret mode uses one tile shape for every call.
* The accumulator is rounded once to the output dtype at the end.

Rows of ``a`` never interact: row ``m`` of the output depends only on row ``m`` of ``a`` and on ``b``,
computed by the same instruction sequence whatever the row's position in its tile, so
``f(x)[i] == f(x[i:i+1])[0]`` bitwise.

``matmul_reference`` is a plain-JAX version with the same tiling semantics (on CPU it reproduces the
interpret-mode bits exactly); ``matmul_f64_reference`` is the accuracy yardstick.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels._rows import round_up
from pallas_kernels.order import MATMUL_BLOCK_K

INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 128

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
PRECISIONS = ("highest", "tf32")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int = MATMUL_BLOCK_K
    num_warps: int = 4
    num_stages: int = 3


# GPU tile configurations. On the GPU the order is fixed by the tensor-core k-steps (16 wide,
# ascending, one accumulator), not by the tile: block_m/block_n/block_k only move work between
# programs and pipeline stages, and every configuration listed here is checked to give the same bits
# (tests/test_matmul.py::test_gpu_configs_bitwise_identical). Interpret mode uses one tile only.
GPU_CONFIGS = {
    "small": TileConfig(16, 32, 128, 2, 4),
    "small_wide": TileConfig(16, 64, 128, 4, 4),
    "small_deep": TileConfig(16, 32, 256, 4, 4),
    "medium": TileConfig(64, 64, 64, 4, 4),
    "medium_deep": TileConfig(64, 64, 128, 4, 4),
    "medium_wide": TileConfig(64, 128, 64, 4, 3),
    "large": TileConfig(128, 128, 64, 8, 3),
    "large_wide": TileConfig(128, 256, 64, 8, 3),
    "large_deep": TileConfig(128, 128, 64, 4, 4),
}


def gpu_config_for(m: int, n: int) -> TileConfig:
    # Chosen from the H100 sweeps (results/2026-11-22-h100/run4_matmul_sweep.json, then
    # results/2026-11-22-h100/s2_sweep.txt: M=16 0.69x -> 0.79x XLA, M=128 0.76x -> 0.97x).
    if m <= 16:
        return GPU_CONFIGS["small_deep"]
    if m <= 128:
        return GPU_CONFIGS["medium_deep"]
    if m <= 256:
        return GPU_CONFIGS["medium"]
    return GPU_CONFIGS["large_wide"]


def _dot_precision(dtype, precision: str):
    if jnp.dtype(dtype) == jnp.float32:
        if precision == "tf32":
            return lax.DotAlgorithmPreset.TF32_TF32_F32
        return lax.Precision.HIGHEST
    return None


def _matmul_kernel(a_ref, b_ref, o_ref, *, k_tiles, block_k, transpose_b, acc_dtype, precision):
    bm = a_ref.shape[-2]
    bn = o_ref.shape[-1]

    def body(t, acc):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        a = a_ref[0, :, ks]
        if transpose_b:
            b = b_ref[0, :, ks]
            prod = lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                   precision=precision, preferred_element_type=acc_dtype)
        else:
            b = b_ref[0, ks, :]
            prod = lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                   precision=precision, preferred_element_type=acc_dtype)
        return acc + prod

    acc = lax.fori_loop(0, _backend.opaque_trip_count(k_tiles), body, jnp.zeros((bm, bn), acc_dtype))
    o_ref[0] = acc.astype(o_ref.dtype)


def matmul_kernel_call(a, b, *, transpose_b=False, out_dtype=None, precision="highest",
                       backend=None, config: TileConfig | None = None):
    """Run the fixed-order matmul kernel.

    Args:
      a: ``[B, M, K]``.
      b: ``[B, K, N]``, or ``[B, N, K]`` when ``transpose_b``.
      out_dtype: result dtype (default: ``a.dtype``).
      precision: ``'highest'`` (f32 inputs at full IEEE f32) or ``'tf32'`` (faster, GPU only).
      backend: override of the detjax backend (see ``pallas_kernels.backend``).
      config: GPU tile configuration; ``None`` picks by shape (all give the same bits).

    Returns:
      ``[B, M, N]`` in ``out_dtype``.

    Inputs must already be validated (same dtype, matching dims); ``detjax.ops`` does that.
    """
    be = _backend.resolve(backend)
    if be in ("tpu", "tpu-interpret"):  # Mosaic TPU lowering, its own documented order
        from pallas_kernels import tpu
        return tpu.matmul_kernel_call(a, b, transpose_b=transpose_b, out_dtype=out_dtype,
                                      precision=precision, backend=be, config=config)
    B, M, K = a.shape
    N = b.shape[1] if transpose_b else b.shape[2]
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    acc_dtype = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
    if be == "gpu":
        cfg = config or gpu_config_for(M, N)
    else:
        cfg = TileConfig(INTERPRET_BLOCK_M, INTERPRET_BLOCK_N)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if be != "gpu" and bk != MATMUL_BLOCK_K:
        raise ValueError(f"block_k={bk}: off the GPU the K tile is fixed at {MATMUL_BLOCK_K}")
    Mp, Np, Kp = round_up(max(M, 1), bm), round_up(max(N, 1), bn), round_up(max(K, 1), bk)
    # Zero padding: padded rows/cols of the output are sliced off; padded K adds exact zeros.
    if (Mp, Kp) != (M, K):
        a = jnp.pad(a, ((0, 0), (0, Mp - M), (0, Kp - K)))
    if transpose_b:
        if (Np, Kp) != (N, K):
            b = jnp.pad(b, ((0, 0), (0, Np - N), (0, Kp - K)))
        b_spec = pl.BlockSpec((1, bn, Kp), lambda bi, i, j: (bi, j, 0))
    else:
        if (Kp, Np) != (K, N):
            b = jnp.pad(b, ((0, 0), (0, Kp - K), (0, Np - N)))
        b_spec = pl.BlockSpec((1, Kp, bn), lambda bi, i, j: (bi, 0, j))
    b_index_batch = b.shape[0] != 1 or B == 1
    if not b_index_batch:  # one weight shared by every batch element
        b_spec = pl.BlockSpec(b_spec.block_shape,
                              (lambda bi, i, j: (0, j, 0)) if transpose_b else (lambda bi, i, j: (0, 0, j)))
    kernel = functools.partial(_matmul_kernel, k_tiles=Kp // bk, block_k=bk, transpose_b=transpose_b,
                               acc_dtype=acc_dtype, precision=_dot_precision(a.dtype, precision))
    compiler_params = None
    if be == "gpu":
        from jax.experimental.pallas import triton as pltriton
        compiler_params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(B, Mp // bm, Np // bn),
        in_specs=[pl.BlockSpec((1, bm, Kp), lambda bi, i, j: (bi, i, 0)), b_spec],
        out_specs=pl.BlockSpec((1, bm, bn), lambda bi, i, j: (bi, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Mp, Np), out_dtype),
        interpret=_backend.interpret_arg(be),
        compiler_params=compiler_params,
        name="detjax_matmul",
    )(a, b)
    if (Mp, Np) != (M, N):
        out = out[:, :M, :N]
    return out


def matmul_reference(a, b, *, transpose_b=False, out_dtype=None, precision="highest"):
    """Plain-JAX matmul with the kernel's semantics: zero-padded 64-wide K tiles, ascending, f32 acc."""
    if transpose_b:
        b = jnp.swapaxes(b, -1, -2)
    K = a.shape[-1]
    Kp = round_up(max(K, 1), MATMUL_BLOCK_K)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, Kp - K)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, Kp - K), (0, 0)])
    acc_dtype = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
    acc = jnp.zeros(a.shape[:-1] + b.shape[-1:], acc_dtype)
    prec = _dot_precision(a.dtype, precision)
    for t in range(Kp // MATMUL_BLOCK_K):
        ks = slice(t * MATMUL_BLOCK_K, (t + 1) * MATMUL_BLOCK_K)
        acc = acc + jnp.matmul(a[..., ks], b[..., ks, :], precision=prec, preferred_element_type=acc_dtype)
    return acc.astype(out_dtype or a.dtype)


def matmul_f64_reference(a, b, *, transpose_b=False):
    """Exact-ish yardstick in float64 (numpy), for accuracy tests."""
    import numpy as np
    a64 = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b64 = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if transpose_b:
        b64 = np.swapaxes(b64, -1, -2)
    return a64 @ b64
