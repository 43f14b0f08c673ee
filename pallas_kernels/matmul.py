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
``f(x)[i] == f(x[i:i+1])[0]`` bitwise. ``M`` and ``N`` are not padded: when the last row (column)
tile of a launch overhangs ``M`` (``N``) its missing rows of ``a`` (columns of ``b``) are loaded as
zeros (a masked load on the GPU) and not stored, so the tile holds the values zero padding would
give, and a decode step (``M`` = batch) or the unembedding (``N`` = vocabulary) does not copy its
operands and outputs around every matmul. On the H100 (session 7, runs s7-12/s7-13) the
output hashes and the GPU batch-invariance, configuration and grouped-kernel tests gave the same
bits as before; one gemma2_2b decode step at batch 8 went from 3.97 to 3.74 ms.

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
from pallas_kernels._rows import masked_load as _masked_rows  # rows/columns past M/N read as 0
from pallas_kernels._rows import masked_store as _store_rows
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
    "small_deep": TileConfig(16, 32, 256, 4, 6),
    "small_deeper": TileConfig(16, 32, 512, 2, 4),   # M <= 16, K >= SMALL_M_DEEPER_K (s13-1, s14-1)
    "medium": TileConfig(64, 64, 64, 4, 4),
    "medium_deep": TileConfig(64, 64, 128, 4, 5),
    "medium_wide": TileConfig(64, 128, 64, 4, 3),
    "large": TileConfig(128, 128, 64, 8, 3),
    "large_wide": TileConfig(128, 256, 64, 8, 3),
    "large_deep": TileConfig(128, 128, 64, 4, 4),
    # float32 at precision 'highest' is a chain of IEEE FMAs on the CUDA cores, not a tensor-core
    # MMA, and wants shallower K tiles. On the H100 (results/2026-11-23-h100/s8_5_sweep_f32.txt,
    # s8_6_sweep_f32_small.txt) the bf16 tiles above ran f32 at M >= 1024 at 2.3-4.9 TFLOP/s and
    # "fma" at 40-46 (XLA's HIGHEST: 49-52); at M <= 128 "fma_small" was the best or within 10%
    # of it when it makes at least a wave of programs, else the deep "small_deep" tile was. Same bits.
    "fma": TileConfig(64, 128, 32, 4, 3),
    "fma_small": TileConfig(16, 64, 64, 4, 3),
}


# At M <= 16 a deep weight (the 2B down projection, K = 9216) streams faster with 512-deep K tiles
# and 2 warps (H200 s13-1: 22.1 -> 19.7 us at M = 8, same bits; 150 of 150 tiles gave the default
# tile's bits).
SMALL_M_DEEPER_K = 8192


def gpu_config_for(m: int, n: int, k: int | None = None, *, fma: bool = False,
                   sms: int = 132) -> TileConfig:
    """The GPU tile for an ``[m, k] x [k, n]`` product (every choice gives the same bits).

    Chosen from the H100 sweeps (results/2026-11-22-h100/run4_matmul_sweep.json, s2_sweep.txt,
    s2_sweep2.txt; ``fma``, float32 inputs at precision 'highest': s8_5_sweep_f32.txt). With ``k``
    given, ``block_k`` is lowered until it divides ``k`` rounded up to 64, so that the weight is
    never padded (copied) on each call just to fit the pipeline tile.
    """
    if fma:   # float32 at 'highest'; ``sms``: a wave of programs (the H100's 132 SMs)
        if m > 128:
            cfg = GPU_CONFIGS["fma"]
        else:
            wave = -(-m // 16) * -(-n // GPU_CONFIGS["fma_small"].block_n) >= sms
            cfg = GPU_CONFIGS["fma_small" if wave else "small_deep"]
    elif m <= 16:
        if k is not None and k >= SMALL_M_DEEPER_K and n < 8192:
            cfg = GPU_CONFIGS["small_deeper"]
        else:
            cfg = GPU_CONFIGS["small_wide" if n >= 8192 else "small_deep"]
    elif m <= 128:
        cfg = GPU_CONFIGS["medium_deep"]
    elif m <= 256:
        cfg = GPU_CONFIGS["medium"]
    else:
        cfg = GPU_CONFIGS["large_wide"]
    if k is not None:
        k64 = round_up(max(k, 1), MATMUL_BLOCK_K)
        bk = cfg.block_k
        while k64 % bk:
            bk //= 2
        cfg = dataclasses.replace(cfg, block_k=max(bk, min(cfg.block_k, MATMUL_BLOCK_K)))
    return cfg


def uses_fma(dtype, precision: str) -> bool:
    """Whether the GPU product is an FMA chain (float32 at 'highest') rather than a tensor-core MMA."""
    return jnp.dtype(dtype) == jnp.float32 and precision != "tf32"


def _dot_precision(dtype, precision: str):
    if jnp.dtype(dtype) == jnp.float32:
        if precision == "tf32":
            return lax.DotAlgorithmPreset.TF32_TF32_F32
        return lax.Precision.HIGHEST
    return None


def _k_loop(a_tile, b_tile, trips, shape, *, block_k, transpose_b, acc_dtype, precision):
    """The K order of every matmul kernel: ``acc = 0``, then ``acc + a_tile(ks) . b_tile(ks)`` for
    the 64-aligned K tiles ``ks`` in ascending order (``b_tile`` is ``[bn, bk]`` with
    ``transpose_b``, else ``[bk, bn]``); returns the f32 accumulator of ``shape``."""
    contract = ((1,), (1,)) if transpose_b else ((1,), (0,))

    def body(t, acc):
        ks = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        prod = lax.dot_general(a_tile(ks), b_tile(ks), (contract, ((), ())),
                               precision=precision, preferred_element_type=acc_dtype)
        return acc + prod

    return lax.fori_loop(0, trips, body, jnp.zeros(shape, acc_dtype))


def _row_mask(rows, row_block, block_m):
    """``[block_m, 1]``: which rows of row tile ``row_block`` lie below ``rows`` (``None``: all)."""
    if rows is None:
        return None
    return (row_block * block_m + jnp.arange(block_m, dtype=jnp.int32) < rows)[:, None]


def _col_mask(cols, col_block, block_n):
    """``[1, block_n]``: which columns of column tile ``col_block`` lie below ``cols`` (``None``:
    all)."""
    if cols is None:
        return None
    return (col_block * block_n + jnp.arange(block_n, dtype=jnp.int32) < cols)[None, :]


def _and(m1, m2):
    return m2 if m1 is None else m1 if m2 is None else m1 & m2


def _matmul_kernel(a_ref, b_ref, *refs, k_tiles, block_k, transpose_b, acc_dtype, precision,
                   aliased=False, rows=None, row_offset=0, cols=None, gpu=True):
    """``rows``/``cols``: the valid rows of ``a`` / columns of the output when the last row /
    column tile overhangs them (masked loads and stores; rows of ``a`` and columns of ``b`` past
    the array are read as 0: the same tile values as zero padding)."""
    o_ref = refs[-1]   # (with ``aliased`` the previous launch's output comes first, never read)
    bm, bn = a_ref.shape[-2], o_ref.shape[-1]
    mask = _row_mask(rows, pl.program_id(1) + row_offset, bm)
    cmask = _col_mask(cols, pl.program_id(2), bn)
    if transpose_b:   # b tile [bn, bk]: its rows are the output's columns
        bmask = None if cmask is None else cmask.reshape(bn, 1)
        b_tile = lambda ks: _masked_rows(b_ref.at[0, :, ks], bmask, gpu)
    else:             # b tile [bk, bn]
        b_tile = lambda ks: _masked_rows(b_ref.at[0, ks, :], cmask, gpu)
    acc = _k_loop(lambda ks: _masked_rows(a_ref.at[0, :, ks], mask, gpu), b_tile,
                  _backend.opaque_trip_count(k_tiles),
                  (bm, bn), block_k=block_k, transpose_b=transpose_b,
                  acc_dtype=acc_dtype, precision=precision)
    _store_rows(o_ref.at[0], acc.astype(o_ref.dtype), _and(mask, cmask), gpu)


# Wave quantisation: a grid of T tiles on S SMs runs ceil(T / S) waves; for the 2B down projection
# (4096 x 2304 output, 288 tiles of 128 x 256 on 132 SMs) the third wave is 18% full. The GPU
# wrapper then launches the rows that fill whole waves with the big tile and the remaining rows with
# the TAIL tile, into the same output buffer (the second launch aliases the first one's output).
# Every tile configuration gives the same bits, so where the split falls never changes a result.
TAIL_CONFIG = TileConfig(64, 128, 64, 4, 4)
_TAIL_COST = 0.4   # time of one wave of TAIL tiles / one wave of big tiles (tile area 1/4, less efficient)


# Shared memory the pipeline may use. Triton keeps num_stages - 1 buffered (A, B) tile pairs; the
# H100 allows 232448 bytes per block (measured: 5 x (16 + 32) x 256 x 4 = 245760 bytes was refused).
GPU_SMEM_BUDGET = 216 * 1024


def fit_shared_memory(cfg: TileConfig, itemsize: int, budget: int = GPU_SMEM_BUDGET) -> TileConfig:
    """Fewer pipeline stages (then a smaller K tile) until the stages fit in shared memory.

    Only pipelining changes: stages and the K tile move no arithmetic (every configuration gives
    the same bits), so a tile tuned for bf16 also serves f32 inputs.
    """
    def need(c):
        return max(c.num_stages - 1, 1) * (c.block_m + c.block_n) * c.block_k * itemsize
    while need(cfg) > budget and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while need(cfg) > budget and cfg.block_k > MATMUL_BLOCK_K:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # noqa: BLE001 - no device query: assume an H100
        return 132


def gpu_split_rows(B: int, M: int, N: int, cfg: TileConfig, sms: int | None = None) -> int | None:
    """Rows computed with ``cfg`` before the tail launch, or ``None`` for a single launch."""
    if B != 1 or cfg.block_m < 128:
        return None
    sms = sms or _num_sms()
    n_tiles_n = -(-N // cfg.block_n)
    tiles = -(-M // cfg.block_m) * n_tiles_n
    full = tiles // sms
    if full < 1 or tiles % sms == 0:
        return None
    m1 = (full * sms // n_tiles_n) * cfg.block_m
    if m1 <= 0 or m1 >= M:
        return None
    tail_tiles = -(-(M - m1) // TAIL_CONFIG.block_m) * -(-N // TAIL_CONFIG.block_n)
    split_cost = -(-(m1 // cfg.block_m) * n_tiles_n // sms) + _TAIL_COST * -(-tail_tiles // sms)
    return m1 if split_cost < 0.9 * -(-tiles // sms) else None


def matmul_kernel_call(a, b, *, transpose_b=False, out_dtype=None, precision="highest",
                       backend=None, config: TileConfig | None = None, split_rows: int | None = None,
                       tail_config: TileConfig | None = None):
    """Run the fixed-order matmul kernel.

    Args:
      a: ``[B, M, K]``.
      b: ``[B, K, N]``, or ``[B, N, K]`` when ``transpose_b``.
      out_dtype: result dtype (default: ``a.dtype``).
      precision: ``'highest'`` (f32 inputs at full IEEE f32) or ``'tf32'`` (faster, GPU only).
      backend: override of the detjax backend (see ``pallas_kernels.backend``).
      config: GPU tile configuration; ``None`` picks by shape (all give the same bits).
      split_rows: compute rows ``[0, split_rows)`` with ``config`` and the rest in a second launch
        with ``tail_config`` (GPU default: ``gpu_split_rows``, against wave quantisation; forced
        values are for tests). Must be a multiple of both tiles' ``block_m``.

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
    if 0 in (B, M, N):
        return jnp.zeros((B, M, N), out_dtype)
    if (be == "gpu" and B == 1 and not transpose_b and config is None and split_rows is None
            and tail_config is None):
        from pallas_kernels import matmul_mgpu
        tile = matmul_mgpu.mgpu_tile_for(M, N, N, K, a.dtype)
        if tile is not None and matmul_mgpu.hopper_available():   # the same bits, faster here
            return _mosaic_rows(a[0], b[0], tile, out_dtype)[None]
    if be == "gpu":
        auto = config is None and split_rows is None
        cfg = config or gpu_config_for(M, N, K, fma=uses_fma(a.dtype, precision))
        if auto:
            split_rows = gpu_split_rows(B, M, N, cfg)
        tail = tail_config or TAIL_CONFIG
        cfg = fit_shared_memory(cfg, a.dtype.itemsize)
        tail = fit_shared_memory(tail, a.dtype.itemsize)
    else:
        cfg = TileConfig(INTERPRET_BLOCK_M, INTERPRET_BLOCK_N)
        tail = cfg
    launches = [(cfg, 0, M)] if not split_rows else [(cfg, 0, split_rows), (tail, split_rows, M)]
    for c, r0, r1 in launches:
        if be != "gpu" and c.block_k != MATMUL_BLOCK_K:
            raise ValueError(f"block_k={c.block_k}: off the GPU the K tile is fixed at {MATMUL_BLOCK_K}")
        if r0 % c.block_m or (r1 != M and r1 % c.block_m) or not 0 <= r0 < r1 <= M:
            raise ValueError(f"split_rows={split_rows} must lie in (0, {M}) and be a multiple of "
                             f"block_m ({cfg.block_m}, {tail.block_m})")
    # K is padded to the K tile (padded K adds exact zeros; the GPU tile divides K rounded up to
    # 64, so only a K that is not a multiple of 64 is copied). M and N are not padded: a launch
    # whose last row (column) tile overhangs M (N) loads the missing rows of ``a`` (columns of
    # ``b``) as 0 and never stores them (``_matmul_kernel``'s ``rows``/``cols``), the tile values of
    # zero padding, without a copy of the operands and the output per call (decode: M = batch;
    # the unembedding: N = a vocabulary that is no multiple of the tile).
    bk_all = max(c.block_k for c, _, _ in launches)
    Kp = round_up(max(K, 1), bk_all)
    if Kp != K:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, Kp - K)))
        b = jnp.pad(b, ((0, 0), (0, 0), (0, Kp - K)) if transpose_b
                    else ((0, 0), (0, Kp - K), (0, 0)))
    b_index_batch = b.shape[0] != 1 or B == 1
    out = None
    for c, r0, r1 in launches:
        bm, bn, bk = c.block_m, c.block_n, c.block_k
        off = r0 // bm
        row_tiles = -(-(r1 - r0) // bm)
        ragged = (r1 - r0) % bm != 0
        if transpose_b:
            b_spec = pl.BlockSpec((1, bn, Kp), (lambda bi, i, j: (bi, j, 0)) if b_index_batch
                                  else (lambda bi, i, j: (0, j, 0)))
        else:
            b_spec = pl.BlockSpec((1, Kp, bn), (lambda bi, i, j: (bi, 0, j)) if b_index_batch
                                  else (lambda bi, i, j: (0, 0, j)))
        kernel = functools.partial(_matmul_kernel, k_tiles=Kp // bk, block_k=bk,
                                   transpose_b=transpose_b, acc_dtype=acc_dtype,
                                   precision=_dot_precision(a.dtype, precision), aliased=out is not None,
                                   rows=M if ragged else None, row_offset=off,
                                   cols=N if N % bn else None, gpu=be == "gpu")
        compiler_params = None
        if be == "gpu":
            from jax.experimental.pallas import triton as pltriton
            compiler_params = pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
        out_spec = pl.BlockSpec((1, bm, bn), lambda bi, i, j, off=off: (bi, i + off, j))
        in_specs = [pl.BlockSpec((1, bm, Kp), lambda bi, i, j, off=off: (bi, i + off, 0)), b_spec]
        args = (a, b)
        if out is not None:   # write the remaining rows into the first launch's buffer
            in_specs.append(out_spec)
            args = (a, b, out)
        out = pl.pallas_call(
            kernel,
            grid=(B, row_tiles, -(-N // bn)),
            in_specs=in_specs,
            out_specs=out_spec,
            out_shape=jax.ShapeDtypeStruct((B, M, N), out_dtype),
            input_output_aliases={2: 0} if len(args) == 3 else {},
            interpret=_backend.interpret_arg(be),
            compiler_params=compiler_params,
            name="detjax_matmul",
        )(*args)
    return out


def _mosaic_rows(a, w, tile, out_dtype):
    """``a [M, K]`` times ``w`` (``[K, N]``, or ``[G, K, H]`` read as ``[K, G * H]``) on the Mosaic
    GPU kernel (``matmul_mgpu``), which gives the Triton kernel's bits.

    Under ``jax.vmap`` the kernel itself is not batched: the rule below turns the mapped axis into
    rows (``[V * M, K]``, dispatched again by the new row count) or, for mapped weights, runs the
    batched Triton kernel. Rows never interact and every path gives the same bits, so
    ``vmap(f)(xs)[i] == f(xs[i])`` holds as for the Triton kernel alone.
    """
    from pallas_kernels import matmul_mgpu

    @jax.custom_batching.custom_vmap
    def product(a, w):
        return matmul_mgpu.matmul(a, w, tile=tile, out_dtype=out_dtype)

    @product.def_vmap
    def _rule(axis_size, in_batched, a, w):
        return _batched_rows_product(axis_size, in_batched, a, w, out_dtype), True

    return product(a, w)


def _as_columns(w):
    """``[K, N]`` or ``[G, K, H]`` (read as ``[K, G * H]``, column ``g * H + h``) -> ``[K, N]``."""
    return w if w.ndim == 2 else jnp.transpose(w, (1, 0, 2)).reshape(w.shape[1], -1)


def _batched_rows_product(v, in_batched, a, w, out_dtype):
    """The vmap rule of ``_mosaic_rows``: ``[V, M, K]`` rows against one weight (or ``V``)."""
    a_b, w_b = in_batched
    if not a_b:
        a = jnp.broadcast_to(a, (v,) + a.shape)
    m, k = a.shape[1], a.shape[2]
    if w_b:   # one weight per example: the batched Triton kernel (an explicit tile: no dispatch)
        wc = jax.vmap(_as_columns)(w)
        n = wc.shape[2]
        return matmul_kernel_call(a, wc, out_dtype=out_dtype, config=gpu_config_for(m, n, k))
    rows = a.reshape(v * m, k)
    if w.ndim == 2:
        out = matmul_kernel_call(rows[None], w[None], out_dtype=out_dtype)[0]
    else:
        out = grouped_matmul_call(rows, (w,), out_dtype=out_dtype)[0]
    return out.reshape(v, m, -1)


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


# ---------------------------------------------------------------------------------------------
# Grouped weights: one launch for several weights in "heads" layout, without transposing them.


def _grouped_kernel(a_ref, *refs, n_w, starts, k_tiles, block_k, acc_dtype, precision, rows=None,
                    gpu=True):
    """Program ``(i, c)``: column tile ``c`` of the concatenated outputs. Column tiles
    ``[starts[w], starts[w + 1])`` belong to weight ``w``; only that weight is read and only its
    output written (``pl.when``). The K loop is ``_matmul_kernel``'s (``_k_loop``), and so are the
    masked rows of an overhanging last row tile (``rows``)."""
    b_refs, o_refs = refs[:n_w], refs[n_w:]
    c = pl.program_id(1)
    trips = _backend.opaque_trip_count(k_tiles)   # read outside pl.when (interpret mode needs it)
    mask = _row_mask(rows, pl.program_id(0), a_ref.shape[0])

    for w in range(n_w):
        b_ref, o_ref = b_refs[w], o_refs[w]

        @pl.when((c >= starts[w]) & (c < starts[w + 1]))
        def _(b_ref=b_ref, o_ref=o_ref):
            acc = _k_loop(lambda ks: _masked_rows(a_ref.at[:, ks], mask, gpu), lambda ks: b_ref[0, ks, :],
                          trips, (a_ref.shape[0], o_ref.shape[-1]), block_k=block_k,
                          transpose_b=False, acc_dtype=acc_dtype, precision=precision)
            _store_rows(o_ref, acc.astype(o_ref.dtype), mask, gpu)


def grouped_block_n(heads_dims, cfg_block_n: int) -> int | None:
    """The N tile for weights of head dims ``heads_dims``: the largest power of two <= the
    configuration's ``block_n`` dividing every head dim, or ``None`` if that is below 16 (Triton's
    smallest dot)."""
    bn = cfg_block_n
    while bn >= 16 and any(h % bn for h in heads_dims):
        bn //= 2
    return bn if bn >= 16 else None


def grouped_matmul_call(a, weights, *, out_dtype=None, precision="highest", backend=None,
                        config: TileConfig | None = None, _interpret_kernel: bool = False):
    """``[a @ w.transpose(1, 0, 2).reshape(K, G * H) for w in weights]`` in one GPU launch.

    Args:
      a: ``[M, K]``.
      weights: tuple of ``[G_w, K, H_w]`` arrays (e.g. Gemma's ``[heads, d_model, head_dim]``
        projections; a plain ``[K, N]`` weight is ``[1, K, N]``), all of ``a``'s dtype.
      out_dtype, precision, backend: as ``matmul_kernel_call``.
      config: GPU tile; ``None`` picks by the total N (every choice gives the same bits).

    Returns:
      a tuple of ``[M, G_w * H_w]`` arrays, column ``g * H_w + h`` of output ``w`` being
      ``sum_k a[:, k] * w[g, k, h]``.

    Each output column is computed by ``_matmul_kernel``'s instruction sequence (same 64-wide K
    tiles from k = 0, same f32 accumulator, same tensor-core k-steps), so it has the bits of
    ``matmul_kernel_call`` on the transposed weight; only the programs' tiling in N differs, which
    does not change bits on the GPU (``tests/test_matmul.py::test_gpu_grouped_matches_matmul``).
    The weights are read in place (no transpose copy). Off the GPU (and for head dims that are not
    multiples of 16) it runs ``matmul_kernel_call`` on transposed weights (``_interpret_kernel``:
    run the grouped kernel in interpret mode instead, to test its indexing on a CPU).
    """
    be = _backend.resolve(backend)
    M, K = a.shape
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    hs = [w.shape[2] for w in weights]
    n_total = sum(w.shape[0] * w.shape[2] for w in weights)
    cfg = None
    if be == "gpu" and config is None:
        from pallas_kernels import matmul_mgpu
        tiles = [matmul_mgpu.mgpu_tile_for(M, w.shape[2], w.shape[0] * w.shape[2], K, a.dtype)
                 for w in weights]
        if all(t is not None for t in tiles) and matmul_mgpu.hopper_available():
            # one Mosaic launch per weight (the same bits as the grouped Triton launch)
            return tuple(_mosaic_rows(a, w, t, out_dtype) for w, t in zip(weights, tiles))
    if be == "gpu" or _interpret_kernel:
        cfg = config or (gpu_config_for(M, n_total, K, fma=uses_fma(a.dtype, precision))
                         if be == "gpu"
                         else TileConfig(INTERPRET_BLOCK_M, INTERPRET_BLOCK_N))
        bn = grouped_block_n(hs, cfg.block_n)
        cfg = None if bn is None else fit_shared_memory(dataclasses.replace(cfg, block_n=bn),
                                                        a.dtype.itemsize)
    if cfg is None:
        return tuple(
            matmul_kernel_call(a[None], jnp.transpose(w, (1, 0, 2)).reshape(1, K, -1),
                               out_dtype=out_dtype, precision=precision, backend=be)[0]
            for w in weights)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    Kp = round_up(max(K, 1), bk)   # M is not padded: masked rows, as in matmul_kernel_call
    if Kp != K:
        a = jnp.pad(a, ((0, 0), (0, Kp - K)))
        weights = tuple(jnp.pad(w, ((0, 0), (0, Kp - K), (0, 0))) for w in weights)
    tiles = [w.shape[0] * w.shape[2] // bn for w in weights]
    starts = [0]
    for t in tiles:
        starts.append(starts[-1] + t)

    def tile(w, c):   # column tile c of the launch -> tile of weight w's output (clamped)
        return jnp.clip(c - starts[w], 0, tiles[w] - 1)

    def b_map(w):
        nh = hs[w] // bn
        return lambda i, c: (tile(w, c) // nh, 0, tile(w, c) % nh)

    def o_map(w):
        return lambda i, c: (i, tile(w, c))

    compiler_params = None
    if be == "gpu":
        from jax.experimental.pallas import triton as pltriton
        compiler_params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    outs = pl.pallas_call(
        functools.partial(_grouped_kernel, n_w=len(weights), starts=tuple(starts),
                          k_tiles=Kp // bk, block_k=bk, acc_dtype=jnp.float32,
                          precision=_dot_precision(a.dtype, precision),
                          rows=M if M % bm else None, gpu=be == "gpu"),
        grid=(-(-M // bm), starts[-1]),
        in_specs=[pl.BlockSpec((bm, Kp), lambda i, c: (i, 0))]
        + [pl.BlockSpec((1, Kp, bn), b_map(w)) for w in range(len(weights))],
        out_specs=[pl.BlockSpec((bm, bn), o_map(w)) for w in range(len(weights))],
        out_shape=[jax.ShapeDtypeStruct((M, w.shape[0] * w.shape[2]), out_dtype) for w in weights],
        interpret=be != "gpu",
        compiler_params=compiler_params,
        name="detjax_matmul_grouped",
    )(a, *weights)
    return tuple(outs)
