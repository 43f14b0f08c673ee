"""Batch-invariant attention on Hopper through Mosaic GPU (wgmma, TMA, warp specialisation).

EXPERIMENTAL and opt-in (``detjax.experimental.mosaic_attention``): its reduction order is not
the Triton kernels' (``pallas_kernels/attention.py``), so its bits differ from ``detjax.ops.attention``;
within this module prefill, chunked prefill and decode give the same bits (decode runs the same
kernel), whatever the batch, the other rows, the layout or ``max_len``. bf16/f16; head dims up to
256; GPU with Mosaic GPU support (sm_90+). Differentiable through ``detjax.experimental`` (the
backward pass is the Triton path's deterministic backward, fed this kernel's log-sum-exp).

The kernel is jax's ``jax.experimental.pallas.ops.gpu.attention_mgpu`` forward (two compute
warpgroups of 64 rows each, one memory warpgroup streaming K/V blocks through a 2-slot TMA
pipeline, ``approx_math``), changed to detjax's row semantics: every row carries its own key
interval ``[lo, hi)`` (causal by absolute positions, sliding windows, lengths: the Triton path's
``row_bounds``), and each CTA of 128 rows walks the union of its rows' KV blocks.

Two layouts of rows, one per-row arithmetic
-------------------------------------------
* ``'tokens'`` (prefill, ``T >= 128``): a CTA's rows are 128 consecutive tokens of one query head,
  read from and written to ``[B, T, N, H]`` in place (no packing passes).
* ``'packed'`` (decode, short chunks): a CTA's rows are the Triton path's packed (token, query head)
  rows of one KV head (row ``t * G + g``), so a decode step's ``G`` heads share one CTA.

A row's result does not depend on which rows share its CTA: the dots are wgmma tiles whose rows
never interact, every reduction is per row, and a block outside a row's interval is an exact
no-op for that row. So the layout is a speed choice, not a bit choice
(``test_gpu_layouts_give_the_same_bits``). The same holds for the CTA's height and the value
split (``test_gpu_cta_height_gives_the_same_bits``, run s12-2):

* prefill CTAs have two compute warpgroups of 64 rows taking turns on the tensor cores; a CTA
  whose packed rows fit in 64 (a decode step: ``T * G <= 64``) has one, so no warpgroup computes
  padding rows, and 3 K/V pipeline slots where they fit in shared memory;
* at small batch, decode splits the value columns over ``E`` = 2 or 4 CTAs
  (``default_value_splits``): each computes the same full ``q . k``, ``m`` and ``l`` and its own
  output columns ``p @ v[:, cols]``, a dot over the same keys whatever the tile's width.

Reduction order (see also ``pallas_kernels/order.py``)
----------------------------------------------------
* KV blocks of ``block_k(head_dim)`` keys (``MGPU_ATTN_BLOCK_K_NARROW`` = 128 for head dims
  <= 128, ``MGPU_ATTN_BLOCK_K`` = 64 above: the 256-wide K/V tiles of two pipeline slots fill the
  shared memory) on an absolute grid anchored at key 0 (block ``j`` = keys ``[b j, b j + b)``),
  visited in ascending ``j``; by default **no splits** (one online softmax per row over all its
  blocks, prefill and decode alike: decode runs the same kernel). Opt-in (``splits=True``, see
  ``SPLITS`` for why not yet the default), the blocks are grouped in the attention order's key splits:
  split ``c`` = keys ``[c ATTN_SPLIT_K, (c + 1) ATTN_SPLIT_K)`` (1024 keys, anchored at key 0),
  each folded from the empty state ``(m, l, acc) = (-inf, 0, +0)``, the split states merged into
  the running total in ascending ``c`` by ``_merge_coeffs`` / ``_merge_chunk`` (below).
  Prefill CTAs walk their splits in turn and merge at each boundary (the total's accumulator
  in registers for value tiles up to ``REGISTER_TOTAL_MAX_HV`` = 128 wide; at head dim 256, where a
  second ``[64, 256]`` float32 tile fits neither the registers nor the shared memory, in a float32
  scratch in global memory); decode over two or more splits runs one CTA per (row block, split)
  writing its state, then ``merge_call`` merges them with the same code (``split_parallel``), so
  decode = prefill by construction while a short batch's decode spreads a long cache over many
  CTAs. The merges' products and sums are explicitly rounded PTX (``_rn``): left to the
  compiler, the two kernels contracted different products into FMAs (run s24-1: 1 element by 1
  bf16 ulp at some positions at head dims 64 / 128).
* Per block, for a row: ``s = q . k`` (wgmma, f32 accumulation over the head dim in k-steps of 16),
  ``s = s * (scale * log2 e)`` (with a soft cap ``c``: ``(c log2 e) * tanh(s * scale / c)``);
  ``m' = max(m, max over the row's valid keys of s)``; ``m_use = m'`` (0 while ``m'`` is
  ``-inf``); ``alpha = 2^(m - m_use)``, ``p = 2^(s - m_use)`` (``ex2.approx``), set to 0 at keys
  outside the row's interval; ``acc = acc * alpha``; ``l = l * alpha + rowsum(p)`` (Mosaic GPU's
  reduction of the block's keys of the row: the same instruction sequence for every row);
  ``acc = acc + p.astype(dtype) @ v`` (wgmma accumulating into ``acc``). ``out = acc / l``,
  exactly 0 for a row with no valid key; ``lse = m ln 2 + ln l`` (natural log; ``-inf`` when
  empty) for the backward pass. The block step's multiplies and adds are Mosaic GPU's
  (contractible: the compiler may form FMAs, e.g. in ``l * alpha + rowsum(p)``). They are the same
  code in every kernel, and the GPU tests check decode = prefill and the layouts bitwise; making
  them explicitly rounded like the merges would change the recorded bits of the order without
  splits.
* Merge of a split state ``(m_s, l_s, acc_s)`` into the total ``(m_t, l_t, acc_t)``:
  ``m' = max(m_t, m_s)``; ``a = 2^(m_t - m')``, ``b = 2^(m_s - m')`` (``ex2.approx``), except
  ``a, b = 1, 0`` for an empty split and ``0, 1`` for an empty total; ``l' = l_t a + l_s b``,
  ``acc' = acc_t a + acc_s b`` elementwise, each product and the sum rounded to float32
  (``mul.rn`` / ``add.rn``, never an FMA; merging 64 columns at a time gives the bits of the
  whole tile). Empty accumulators are +0, so empty splits are exact no-ops. In the split order
  ``lse = m ln 2 + ln l`` is rounded the same way.
* The mask is applied *after* ``s`` and ``p`` are computed (to the max's input and to ``p``), so
  the arithmetic chain ``s -> s - m_use -> 2^.`` is the same whether a block is masked or not;
  blocks valid for every row of a CTA skip the mask (``block_ranges``' full range). Which blocks a
  CTA masks depends on its other rows, so this is what keeps the layouts and decode = prefill
  bitwise (checked on the GPU: ``test_gpu_decode_equals_prefill``, ``test_gpu_layouts_give_the_same_bits``).
* A block with no valid key for a row changes nothing in that row for finite values
  (``alpha = 1``, ``p = 0``), so the union of intervals a CTA walks, and therefore the batch, the
  other rows and the cache's ``max_len``, never changes a row's bits.

Not covered (use ``detjax.ops.attention``): float32; non-finite *values* in a visited block
outside a row's interval (a NaN/inf value past a sequence's length in the cache's last visited
block reaches the row as ``0 * NaN`` in ``p @ v``: keep caches finite, e.g. zero-initialised;
non-finite *keys* there are harmless).

GPU evidence (H200, runs s11-1/s11-2 in ``results/``): the tests of ``tests/test_mosaic_attention.py``
and ``tests/test_model_mosaic.py`` pass (accuracy, the two layouts bitwise equal, batch / vmap /
run to run, decode = prefill at head dims 128 and 256, gradients, the model's generation);
prefill at 0.87-0.96x cuDNN on the attention issue's 16 shapes; decode at 97% of the copy
bandwidth at B64 with 8k keys (s11-2). Runs s12-1 to s12-3: decode at the gemma2_2b shape (B8,
768 keys, head dim 256) 20.8 us (XLA 22.2, the Triton path 43.4); gemma2_2b generation with
``attention_kernel='mosaic'`` at 1.13 / 0.91 / 1.15x XLA (B1 / B8 / B64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import (DECODE_TARGET_PROGRAMS, pack_row_ints, pack_rows, row_bounds,
                                      unpack_row_scalars, unpack_rows)
from pallas_kernels.order import ATTN_SPLIT_K, MGPU_ATTN_BLOCK_K, MGPU_ATTN_BLOCK_K_NARROW

BLOCK_Q = 64          # rows per compute warpgroup (wgmma's M)
CTA_ROWS = 2 * BLOCK_Q  # rows of a prefill CTA: two compute warpgroups taking turns on the tensor cores
MAX_HEAD_DIM = 256    # q, k and v slots of a [64, 256] tile fill 193 KB of the 227 KB of SMEM
LAYOUTS = ("tokens", "packed")
_BIG = 2 ** 30
_SMEM_BUDGET = 220 * 1024   # of the 227 KB a CTA may use; the rest for barriers and row scalars
_LN2 = math.log(2.0)


def block_k(head_dim: int) -> int:
    """KV block of the kernel for this head dim (a multiple of 64): part of the reduction order."""
    return MGPU_ATTN_BLOCK_K_NARROW if head_dim <= 128 else MGPU_ATTN_BLOCK_K


def padded_head_dim(head_dim: int) -> int:
    """wgmma tiles take head dims in multiples of 64 (zero columns are exact)."""
    return -(-head_dim // 64) * 64


def default_layout(t: int) -> str:
    return "tokens" if t >= CTA_ROWS else "packed"


def default_compute_wgs(layout: str, real_rows: int) -> int:
    """Compute warpgroups per CTA: one when the packed rows of a KV head fit in one warpgroup's 64
    (a decode step: ``T * G <= 64``), else two. A speed choice, not a bit choice."""
    return 1 if layout == "packed" and real_rows <= BLOCK_Q else 2


def default_value_splits(head_dim: int, ctas: int, compute_wgs: int) -> int:
    """Value-column split E of a launch of ``ctas`` CTAs (before splitting): only for
    one-warpgroup (decode) CTAs, doubled while the parts keep >= 64 columns and the grid stays
    within ``DECODE_TARGET_PROGRAMS`` (2 per SM), the Triton decode's rule. Run s12-1 (H200): the
    best of E = 1, 2, 4 at 9 of 9 decode shapes (gemma2_2b B8 cache 768: 24.3 -> 20.8 us; B64:
    E = 1). A speed choice: the same bits for every E (``test_gpu_cta_height_gives_the_same_bits``)."""
    e = 1
    if compute_wgs != 1:
        return e
    while head_dim // (2 * e) >= 64 and ctas * 2 * e <= DECODE_TARGET_PROGRAMS:
        e *= 2
    return e


def block_ranges(lo, hi, real_rows: int, block_kv: int, cta_rows: int = CTA_ROWS):
    """``[..., R/cta_rows, 4]`` int32 per CTA of ``cta_rows`` rows (``lo, hi: [..., R]``): ``[start, end)``, the
    KV blocks touched by any row (empty: ``[0, 0)``), and ``[full_start, full_end)`` inside it, the
    blocks valid for every *real* row of the CTA. Rows at index ``>= real_rows`` are padding whose
    output is discarded, so they never narrow the full range; the full range is empty when some
    real row has an empty interval."""
    *lead, r = lo.shape
    shape = (*lead, r // cta_rows, cta_rows)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    real = (jnp.arange(r, dtype=jnp.int32) < real_rows).reshape(r // cta_rows, cta_rows)
    ne = hi > lo
    start = jnp.min(jnp.where(ne, lo, _BIG), axis=-1) // block_kv
    end = (jnp.max(jnp.where(ne, hi, 0), axis=-1) + block_kv - 1) // block_kv
    start = jnp.where(end > 0, start, 0)
    end = jnp.maximum(end, start)
    all_ne = jnp.all(ne | ~real, axis=-1) & jnp.any(real, axis=-1)
    fs = (jnp.max(jnp.where(real, lo, 0), axis=-1) + block_kv - 1) // block_kv
    fe = jnp.min(jnp.where(real, hi, _BIG), axis=-1) // block_kv
    fs = jnp.clip(fs, start, end)
    fe = jnp.where(all_ne, jnp.clip(fe, fs, end), fs)
    return jnp.stack([start, end, fs, fe], axis=-1).astype(jnp.int32)


def default_split_parallel(layout: str, compute_wgs: int, ns: int) -> bool:
    """Decode (one-warpgroup packed CTAs) over two or more key splits runs one CTA per split and
    ``merge_call``; prefill merges inside its CTAs. A speed choice that keeps the bits (the
    same merge code, explicitly rounded: H100 run s24-2, decode = prefill at head dims 64-256)."""
    return layout == "packed" and compute_wgs == 1 and ns >= 2


def pipeline_steps(head_dim: int, compute_wgs: int, block_kv: int, itemsize: int = 2,
                   value_splits: int = 1) -> int:
    """K/V pipeline slots: 3 when they fit in shared memory with the q (and output) tiles, else 2.
    A speed choice only: the slots change when a block arrives, not what is computed with it."""
    hv = head_dim // value_splits
    tiles = compute_wgs * BLOCK_Q * (head_dim + (hv if value_splits > 1 else 0)) * itemsize
    slot_bytes = block_kv * (head_dim + hv) * itemsize
    return 3 if tiles + 3 * slot_bytes <= _SMEM_BUDGET else 2


def split_blocks(block_kv: int) -> int:
    """KV blocks per key split (``ATTN_SPLIT_K`` keys, anchored at key 0): part of the order."""
    return ATTN_SPLIT_K // block_kv


def num_splits(s: int) -> int:
    """Key splits of a (padded) cache of ``s`` keys."""
    return max(1, -(-s // ATTN_SPLIT_K))


def _merge_coeffs(m_t, m_s):
    """Per-row coefficients of ``merge(total, split) = total * a + split * b`` and the merged max.

    The one merge rule of the kernel (``_merge_chunk`` applies it): an empty split leaves the
    total as it is (``a = 1, b = 0``), an empty total takes the split as it is (``a = 0, b = 1``);
    otherwise ``m' = max``, ``a = 2^(m_t - m')``, ``b = 2^(m_s - m')``. Empty accumulators are +0
    (never -0, never garbage: a total is only read after a merge wrote it), so ``x * 1 + 0`` and
    ``0 * 0 + x`` give ``x`` bitwise and empty splits are exact no-ops."""
    t_empty = m_t == -jnp.inf
    s_empty = m_s == -jnp.inf
    m_new = jnp.maximum(m_t, m_s)
    m_use = jnp.where(t_empty | s_empty, 0.0, m_new)
    a = jnp.where(s_empty, 1.0, jnp.where(t_empty, 0.0, jnp.exp2(m_t - m_use)))
    b = jnp.where(s_empty, 0.0, jnp.where(t_empty, 1.0, jnp.exp2(m_s - m_use)))
    return a, b, m_new


def _rn(instr, x, y):
    """``x * y`` (``instr='mul'``) or ``x + y`` (``'add'``), float32 elementwise, inside a Mosaic GPU
    kernel as one PTX instruction with an explicit rounding mode (``mul.rn.f32`` / ``add.rn.f32``).

    Mosaic GPU emits its float multiplies and adds with LLVM's ``contract`` flag and PTX's plain
    ``mul.f32`` / ``add.f32``, which LLVM and ptxas may fuse into an FMA, or not, kernel by
    kernel. So the same ``t * a + p * b`` in two kernels may round differently: the split-parallel
    decode's ``merge_call`` and the prefill's in-kernel merge differed in 1 element by 1 bf16 ulp
    at 5 of 28 (t, row) pairs on the H100 (run s24-1, ``results/2026-12-07-h100-s24``). An
    ``.rn`` instruction is never contracted (PTX ISA, "mul"/"add": only the forms without a
    rounding modifier may be fused), so every merge rounds each product and the sum, in every
    kernel. ``x, y [64, w]`` (WGMMA layout) or ``[64]`` (its row reduction)."""
    from jax.experimental.mosaic.gpu import fragmented_array as _fa
    layout = plgpu.Layout.WGMMA if x.ndim == 2 else plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(arg_types=(layout, layout),
                       return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout))
    def op(_ctx, xa, ya):
        return xa._pointwise(_fa.FragmentedArray._lift_fast_instr(f"{instr}.rn.f32"), ya)

    return op(plgpu.layout_cast(x, layout), plgpu.layout_cast(y, layout))


def _mul_rn(x, y):
    return _rn("mul", x, y)


def _add_rn(x, y):
    return _rn("add", x, y)


def _merge_chunk(a, b, total, part, mul=_mul_rn, add=_add_rn):
    """``total * a + part * b`` per row (``a, b [64]``; ``total, part [64, w]`` accumulator columns,
    or ``[64]``: the ``l``s): elementwise, so a column chunk merges to the bits of the whole tile;
    each product and the sum rounded to float32 (``_rn``: never an FMA, in any kernel). ``mul`` /
    ``add``: ``jnp.multiply`` / ``jnp.add`` outside a kernel (the same IEEE semantics, for the CPU
    tests)."""
    def rows(c):   # a row's coefficient over its columns
        return lax.broadcast_in_dim(c, total.shape, [0]) if total.ndim == 2 else c

    return add(mul(total, rows(a)), mul(part, rows(b)))


def _merge_state(total, part):
    """The split state ``part = (acc, m, l)`` merged into the running ``total`` (whole tiles): the
    one merge of ``merge_call`` and of the prefill's register total."""
    (acc_t, m_t, l_t), (acc_s, m_s, l_s) = total, part
    a, b, m_new = _merge_coeffs(m_t, m_s)
    return _merge_chunk(a, b, acc_t, acc_s), m_new, _merge_chunk(a, b, l_t, l_s)


def _finalize(acc, m_i, l_i, rounded=False):
    """``(acc / l, lse)`` of a row state, float32: the output exactly 0 and ``lse = -inf`` for an
    empty row. The one finalisation of the kernel and of ``merge_call`` (their outputs must agree
    bitwise). ``rounded`` (the split order's kernels: the in-kernel merge's emit and
    ``merge_call``): ``lse``'s product and sum by ``_rn`` (never an FMA). Without it (the order
    without splits, whose bits sessions 10-23 recorded) the compiler's choice, one kernel."""
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    if rounded:
        lse = _add_rn(_mul_rn(m_i, jnp.full(m_i.shape, _LN2, jnp.float32)), jnp.log(l_safe))
    else:
        lse = m_i * _LN2 + jnp.log(l_safe)
    lse = jnp.where(empty, -jnp.inf, lse)
    return acc / lax.broadcast_in_dim(l_safe, acc.shape, [0]), lse


#: Columns of the global-scratch total loaded / merged / stored at a time (32 registers). 32 gave
#: the same bits and no gain (H100 s24-2: head dim 256 5.88 vs 5.91 ms, head dim 128 2.38 vs 2.25).
MERGE_CHUNK = 64
#: Widest value tile (``H / value_splits``) whose split-order prefill keeps the running total in
#: registers (a loop carry beside the split's accumulator) instead of the float32 global scratch.
#: A speed choice, not a bit choice: the same ``_merge_chunk`` on the same values
#: (a float32 store and load are exact). At 64 the total is 32 registers a thread, at 128 64 (ptxas
#: then spills 128 bytes, and it is still faster). H100 run s24-2 (B8 T8192 K4 N8, causal bf16, the
#: same bits each way): head dim 128 2.02 ms in registers against 2.25 in the global scratch
#: (cuDNN 1.71: 0.85x against 0.76x); head dim 64 1.40 against 1.49 ms (0.85x / 0.80x). At 256 the
#: total cannot fit: the scratch path, already spilling ~190 bytes, runs at 0.53x cuDNN.
REGISTER_TOTAL_MAX_HV = 128

#: Whether ``forward`` (so ``detjax.experimental.mosaic_attention`` / ``mosaic_decode_attention``)
#: uses the key splits by default. **Off.** The split order is implemented and bitwise consistent
#: on the GPU: H100 run s24-2 (``results/2026-12-07-h100-s24``), decode = prefill at 12 positions
#: on and across block and split boundaries at head dims 64 / 128 / 256 once the merges were
#: explicitly rounded (``_rn``; session 23's failures were FMA contraction). What keeps it off is
#: prefill speed at head dim 256: 0.52x cuDNN against 0.83x without splits (the total in the global
#: scratch, and ~190 bytes of spills); at head dims 64 / 128 the total in registers gives
#: 0.85x (0.87 / 0.94x without). Until head dim 256 is fixed the kernel keeps the order without
#: splits, which ``splits=True`` (``forward``) overrides.
SPLITS = False


def mosaic_attention_call(q, k, v, lo, hi, rng, *, layout, scale, soft_cap=None, block_kv=None,
                          steps=None, compute_wgs=2, value_splits=1, splits=False,
                          split_parallel=False):
    """The kernel on prepared operands. Returns ``(o, lse)``, ``o`` like ``q``, ``lse`` float32.

    A CTA has ``compute_wgs`` (1 or 2) compute warpgroups of 64 rows each and one memory
    warpgroup; ``C = 64 * compute_wgs`` rows per CTA. With two, the warpgroups take turns on the
    tensor cores (one's softmax overlaps the other's wgmma); one is for decode, where a CTA has
    only a few real rows and the second warpgroup would compute padding. Rows never interact, so
    ``compute_wgs`` and ``steps`` (K/V pipeline slots, default ``pipeline_steps``) are speed
    choices, not bit choices (``test_gpu_cta_height_gives_the_same_bits``).

    ``value_splits`` (E): E CTAs share a row block, each computing the output columns
    ``[e * H/E, (e + 1) * H/E)`` (``p @ v[:, cols]``) after the same full ``q . k``, ``m`` and ``l``:
    more CTAs for small-batch decode, at the price of reading K E times. Each output column is a
    dot over the same keys whatever the tile's width, so this is a speed choice too: E = 1, 2, 4
    gave the same bits on the GPU (runs s12-1, s12-2).

    ``splits`` (the reduction order; see the module doc): each ``ATTN_SPLIT_K``-key split of a
    row's keys is folded from the empty state and merged into the running total in ascending
    order. A CTA walks its splits in turn, keeping the split state in registers and the running
    total's accumulator in a float32 scratch in global memory (``[B, heads, rows, H]``, an extra
    output, meant to stay in L2 between a CTA's merges), merged ``MERGE_CHUNK`` columns at a time.
    ``splits=False`` is the order of sessions 10-22 (one online softmax over all blocks).

    ``split_parallel`` (with ``splits``; speed, not bits): one CTA per (row block, split), each
    writing its split state (``acc`` float32, ``m``, ``l``) instead of an output; returns
    ``(acc [B, heads, ns, rows, H], m, l [B, heads, ns, rows])`` for ``merge_call``, which merges
    them with the same ``_merge_coeffs`` / ``_merge_chunk`` and ``_finalize`` as this kernel.

    * ``layout='tokens'``: ``q [B, Tp, N, H]`` (``Tp`` a multiple of ``C``), ``lo, hi [B, Tp]``,
      ``rng [B, Tp/C, 4]``; ``lse [B, N, Tp]``.
    * ``layout='packed'``: ``q [B, K, Rp, H]`` packed rows (``Rp`` a multiple of ``C``),
      ``lo, hi [B, Rp]``, ``rng [B, Rp/C, 4]``; ``lse [B, K, Rp]``.

    ``k, v [B, S, K, H]`` with ``S`` a multiple of ``block_kv`` (default ``block_k(H)``) and ``H`` a
    multiple of 64; ``rng`` from ``block_ranges(..., cta_rows=C)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if compute_wgs not in (1, 2):
        raise ValueError(f"compute_wgs must be 1 or 2; got {compute_wgs!r}")
    if split_parallel and not splits:
        raise ValueError("split_parallel needs splits=True")
    cta_rows = compute_wgs * BLOCK_Q
    nwg = compute_wgs
    h = q.shape[-1]
    ne = int(value_splits)
    if ne < 1 or h % ne or (h // ne) % 64:
        raise ValueError(f"value_splits must divide head dim {h} into multiples of 64; got {value_splits!r}")
    hv = h // ne
    block_kv = block_k(h) if block_kv is None else block_kv
    if layout == "tokens":
        b, rows, heads, _ = q.shape
        group = heads // k.shape[2]
    else:
        b, heads, rows, _ = q.shape
        group = 1
    dtype = q.dtype
    if steps is None:   # two warpgroups: the 2 slots measured in s11-2; one: 3 where they fit
        steps = 2 if compute_wgs == 2 else pipeline_steps(h, 1, block_kv, jnp.dtype(dtype).itemsize, ne)
    assert rows % cta_rows == 0 and k.shape[1] % block_kv == 0 and h % 64 == 0, (q.shape, k.shape)
    log2e = math.log2(math.e)
    ns = num_splits(k.shape[1]) if splits else 1
    bps = split_blocks(block_kv) if splits else _BIG
    merges = splits and ns > 1 and not split_parallel   # a CTA may span two splits: running total
    reg_total = merges and hv <= REGISTER_TOTAL_MAX_HV    # ... in registers
    scratch = merges and not reg_total                    # ... or in a global float32 scratch
    nsg = ns if split_parallel else 1                      # grid CTAs per row block along the splits
    chunk = min(MERGE_CHUNK, hv)

    def q_slice(ref, bi, hd, row0):
        if layout == "tokens":
            return ref.at[bi, pl.ds(row0, BLOCK_Q), hd]
        return ref.at[bi, hd, pl.ds(row0, BLOCK_Q)]

    def kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, outs, scoped):
        bi = lax.axis_index("batch")
        hx = lax.axis_index("heads")
        per_head = nsg * ne
        hd = lax.div(hx, jnp.array(per_head, hx.dtype)) if per_head > 1 else hx
        ve = lax.rem(hx, jnp.array(ne, hx.dtype)) if ne > 1 else None
        sc = lax.rem(lax.div(hx, jnp.array(ne, hx.dtype)), jnp.array(nsg, hx.dtype)) if nsg > 1 else None
        qi = lax.axis_index("q_seq")
        wg = lax.axis_index("wg")
        kvh = lax.div(hd, jnp.array(group, hd.dtype)) if group > 1 else hd
        (qo_smem2, k_smem, v_smem, lo_smem2, hi_smem2, lse_smem2, l_smem2, *o_smem2), \
            (k_bar, v_bar, q_bar, lo_bar, hi_bar), (k_used, v_used), sched = scoped
        start, end = rng_ref[bi, qi, 0], rng_ref[bi, qi, 1]
        fs, fe = rng_ref[bi, qi, 2], rng_ref[bi, qi, 3]
        if split_parallel:   # this CTA's part of the range: the blocks of split sc
            blk0 = jnp.maximum(start, sc * bps)
            blk_end = jnp.maximum(jnp.minimum(end, (sc + 1) * bps), blk0)
        else:
            blk0, blk_end = start, end
        nsteps = blk_end - blk0
        full0 = jnp.clip(fs, blk0, blk_end) - blk0
        full1 = jnp.clip(fe, blk0 + full0, blk_end) - blk0
        col0 = 0 if ne == 1 else ve * hv

        def sched_barrier():   # the two compute warpgroups take turns (none with one)
            if nwg == 2:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < nwg)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lo_smem, hi_smem = qo_smem2.at[wg], lo_smem2.at[wg], hi_smem2.at[wg]
            lse_smem, l_smem = lse_smem2.at[wg], l_smem2.at[wg]
            row0 = qi * cta_rows + wg * BLOCK_Q
            plgpu.copy_gmem_to_smem(q_slice(q_ref, bi, hd, row0), qo_smem, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lo_ref.at[bi, pl.ds(row0, BLOCK_Q)], lo_smem, lo_bar.at[wg])
            plgpu.copy_gmem_to_smem(hi_ref.at[bi, pl.ds(row0, BLOCK_Q)], hi_smem, hi_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(lo_bar.at[wg])
            plgpu.barrier_wait(hi_bar.at[wg])
            row_lo = plgpu.load(lo_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            row_hi = plgpu.load(hi_smem, layout=plgpu.Layout.WGMMA.reduce(1))

            @pl.when(nsteps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            if nwg == 2:
                pl.when(wg == 1)(sched_barrier)

            def kv_loop(step, carry, masked):
                acc, m_i, l_i = carry
                slot = lax.rem(step, jnp.array(steps, step.dtype))

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    sched_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                if soft_cap is None:
                    s = s * (scale * log2e)          # logits in the log2 domain
                else:
                    s = (soft_cap * log2e) * jnp.tanh(s * (scale / soft_cap))
                if masked:   # the mask never sits inside the s -> p chain (see the header)
                    base = (blk0 + step) * block_kv
                    kidx = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                                  layout=plgpu.Layout.WGMMA)
                    valid = ((kidx >= lax.broadcast_in_dim(row_lo - base, s.shape, [0]))
                             & (kidx < lax.broadcast_in_dim(row_hi - base, s.shape, [0])))
                    s_max = jnp.where(valid, s, -jnp.inf).max(axis=1)
                else:
                    s_max = s.max(axis=1)
                m_new = jnp.maximum(m_i, s_max)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                if masked:
                    p = jnp.where(valid, p, 0.0)
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                if nwg == 2:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                if nwg == 2:
                    plgpu.barrier_wait(sched)

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = step + 1

                    @pl.when(nxt < nsteps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.array(steps, nxt.dtype))])

                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            def run_split(c):
                """The state of split ``c`` (blocks ``[c bps, (c + 1) bps)`` of this CTA's range),
                folded from the empty state: masked head, unmasked middle, masked tail."""
                a0 = jnp.clip(c * bps - blk0, 0, nsteps)
                a1 = jnp.clip((c + 1) * bps - blk0, a0, nsteps)
                m1 = jnp.clip(full0, a0, a1)
                m2 = jnp.clip(full1, m1, a1)
                carry = (plgpu.layout_cast(jnp.full((BLOCK_Q, hv), 0, jnp.float32), plgpu.Layout.WGMMA),
                         plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)),
                         plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)))
                carry = lax.fori_loop(a0, m1, lambda j, cr: kv_loop(j, cr, True), carry)
                carry = lax.fori_loop(m1, m2, lambda j, cr: kv_loop(j, cr, False), carry)
                return lax.fori_loop(m2, a1, lambda j, cr: kv_loop(j, cr, True), carry)

            def out_cols(ref):   # this CTA's value columns of a row-major [.., 64, H] f32 ref
                return ref if ne == 1 else ref.at[:, pl.ds(col0, hv)]

            def emit_output(acc, m_i, l_i):
                acc, lse = _finalize(acc, m_i, l_i, rounded=splits)
                lse_smem[...] = lse
                if ne == 1:
                    qo_smem[...] = acc.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(qo_smem, q_slice(outs[0], bi, hd, row0))
                    plgpu.copy_smem_to_gmem(lse_smem, outs[1].at[bi, hd, pl.ds(row0, BLOCK_Q)])
                else:
                    o_smem = o_smem2[0].at[wg]
                    o_smem[...] = acc.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, q_slice(outs[0], bi, hd, row0).at[:, pl.ds(col0, hv)])

                    @pl.when(ve == 0)   # one writer per lse element
                    def _():
                        plgpu.copy_smem_to_gmem(lse_smem, outs[1].at[bi, hd, pl.ds(row0, BLOCK_Q)])
                plgpu.wait_smem_to_gmem(0)

            if split_parallel:   # one split: write its state for merge_call
                acc_st, m_st, l_st = outs
                acc, m_i, l_i = run_split(sc)
                out_cols(acc_st.at[bi, hd, sc, pl.ds(row0, BLOCK_Q)])[...] = acc
                lse_smem[...] = m_i
                l_smem[...] = l_i
                plgpu.commit_smem()

                @pl.when(ve == 0) if ne > 1 else (lambda f: f())
                def _():
                    plgpu.copy_smem_to_gmem(lse_smem, m_st.at[bi, hd, sc, pl.ds(row0, BLOCK_Q)])
                    plgpu.copy_smem_to_gmem(l_smem, l_st.at[bi, hd, sc, pl.ds(row0, BLOCK_Q)])
                plgpu.wait_smem_to_gmem(0)
            else:
                c_first = lax.div(blk0, jnp.array(bps, blk0.dtype))
                c_last = lax.div(blk0 + nsteps - 1, jnp.array(bps, blk0.dtype))
                nspl = jnp.where(nsteps > 0, c_last - c_first + 1, 0)
                acc, m_i, l_i = run_split(c_first)
                if reg_total:   # the first split is the total; merge the others into it in turn
                    emit_output(*lax.fori_loop(
                        1, nspl, lambda i, total: _merge_state(total, run_split(c_first + i)),
                        (acc, m_i, l_i)))
                elif not scratch:
                    emit_output(acc, m_i, l_i)
                else:
                    tot = outs[2].at[bi, hd, pl.ds(row0, BLOCK_Q)]   # [64, H] float32

                    def tot_chunk(w):
                        return tot.at[:, pl.ds(col0 + w * chunk, chunk)]

                    def merge_into(m_t, l_t, part, last):
                        """Merge split state ``part`` into the total (accumulator in ``tot``):
                        store the merged total, or (``last``) return it."""
                        acc_s, m_s, l_s = part
                        a, bb, m_new = _merge_coeffs(m_t, m_s)
                        l_new = _merge_chunk(a, bb, l_t, l_s)
                        merged = []
                        for w in range(hv // chunk):
                            t_w = plgpu.load(tot_chunk(w), layout=plgpu.Layout.WGMMA, optimized=False)
                            mw = _merge_chunk(a, bb, t_w, acc_s[:, w * chunk:(w + 1) * chunk])
                            if last:
                                merged.append(mw)
                            else:
                                tot_chunk(w)[...] = mw
                        if last:
                            merged = merged[0] if len(merged) == 1 else jnp.concatenate(merged, axis=1)
                            return merged, m_new, l_new
                        return m_new, l_new

                    @pl.when(nspl <= 1)
                    def _():
                        emit_output(acc, m_i, l_i)

                    @pl.when(nspl > 1)   # the first split is the total (merge with the empty total)
                    def _():
                        for w in range(hv // chunk):
                            tot_chunk(w)[...] = acc[:, w * chunk:(w + 1) * chunk]

                    m_t, l_t = lax.fori_loop(
                        1, nspl - 1, lambda i, ml: merge_into(*ml, run_split(c_first + i), False),
                        (m_i, l_i))

                    @pl.when(nspl > 1)
                    def _():
                        emit_output(*merge_into(m_t, l_t, run_split(c_last), True))
            if nwg == 2:
                pl.when(wg == 0)(sched_barrier)

        def v_cols(ref):   # this CTA's value columns
            return ref if ne == 1 else ref.at[:, pl.ds(ve * hv, hv)]

        @pl.when(wg == nwg)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            for i in range(steps):
                @pl.when(i < nsteps)
                def _(i=i):
                    sl = (bi, pl.ds((blk0 + i) * block_kv, block_kv), kvh)
                    plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[i], k_bar.at[i])
                    plgpu.copy_gmem_to_smem(v_cols(v_ref.at[sl]), v_smem.at[i], v_bar.at[i])

            @pl.loop(0, jnp.maximum(nsteps - steps, 0))
            def _(step):
                tma_step = step + steps
                slot = lax.rem(step, jnp.array(steps, step.dtype))
                sl = (bi, pl.ds((blk0 + tma_step) * block_kv, block_kv), kvh)
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
                plgpu.barrier_wait(v_used.at[slot])
                plgpu.copy_gmem_to_smem(v_cols(v_ref.at[sl]), v_smem.at[slot], v_bar.at[slot])

    def entry(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, *outs):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (plgpu.SMEM((nwg, BLOCK_Q, h), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((steps, block_kv, h), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((steps, block_kv, hv), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((nwg, BLOCK_Q), jnp.int32),
                plgpu.SMEM((nwg, BLOCK_Q), jnp.int32),
                plgpu.SMEM((nwg, BLOCK_Q), jnp.float32),
                plgpu.SMEM((nwg, BLOCK_Q), jnp.float32))
        if ne > 1:   # the output tile of this CTA's value columns (q's tile is wider)
            smem += (plgpu.SMEM((nwg, BLOCK_Q, hv), dtype, transforms=(tiling, swizzle)),)
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, outs, args),
            smem,
            (plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps),
             plgpu.Barrier(num_barriers=nwg), plgpu.Barrier(num_barriers=nwg),
             plgpu.Barrier(num_barriers=nwg)),
            (plgpu.Barrier(num_arrivals=nwg, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    if split_parallel:
        out_type = (jax.ShapeDtypeStruct((b, heads, ns, rows, h), jnp.float32),
                    jax.ShapeDtypeStruct((b, heads, ns, rows), jnp.float32),
                    jax.ShapeDtypeStruct((b, heads, ns, rows), jnp.float32))
    else:
        out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, heads, rows), jnp.float32))
        if scratch:
            out_type += (jax.ShapeDtypeStruct((b, heads, rows, h), jnp.float32),)
    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(heads * nsg * ne, rows // cta_rows, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, lo, hi, rng)
    return tuple(res) if split_parallel else (res[0], res[1])


def merge_call(acc, m, l, rng64, *, dtype, block_kv):
    """Decode's second kernel after ``mosaic_attention_call(..., split_parallel=True)``: for each
    64 packed rows, the split states of the splits its rows touch (``rng64`` = ``block_ranges(...,
    cta_rows=64)``), merged in ascending order from the empty total by ``_merge_coeffs`` /
    ``_merge_chunk`` and finalised by ``_finalize``: the in-kernel merge's arithmetic, so the
    bits of the one-kernel path. ``acc [B, K, ns, Rp, H]`` float32, ``m, l [B, K, ns, Rp]``.
    Returns ``(o [B, K, Rp, H] dtype, lse [B, K, Rp])``."""
    b, heads, ns, rows, h = acc.shape
    bps = split_blocks(block_kv)
    red = plgpu.Layout.WGMMA.reduce(1)

    def kernel(acc_ref, m_ref, l_ref, rng_ref, o_ref, lse_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        pl.run_scoped(lambda o_smem, lse_smem: merge(acc_ref, m_ref, l_ref, rng_ref, o_ref, lse_ref,
                                                     o_smem, lse_smem),
                      plgpu.SMEM((BLOCK_Q, h), dtype, transforms=(tiling, swizzle)),
                      plgpu.SMEM((BLOCK_Q,), jnp.float32))

    def merge(acc_ref, m_ref, l_ref, rng_ref, o_ref, lse_ref, o_smem, lse_smem):
        bi = lax.axis_index("batch")
        hd = lax.axis_index("heads")
        qi = lax.axis_index("q_seq")
        row0 = qi * BLOCK_Q
        start, end = rng_ref[bi, qi, 0], rng_ref[bi, qi, 1]
        c0 = lax.div(start, jnp.array(bps, start.dtype))
        c1 = jnp.where(end > start, lax.div(end - 1, jnp.array(bps, end.dtype)) + 1, c0)

        def body(c, carry):
            m_s = plgpu.load(m_ref.at[bi, hd, c, pl.ds(row0, BLOCK_Q)], layout=red, optimized=False)
            l_s = plgpu.load(l_ref.at[bi, hd, c, pl.ds(row0, BLOCK_Q)], layout=red, optimized=False)
            part = plgpu.load(acc_ref.at[bi, hd, c, pl.ds(row0, BLOCK_Q)], layout=plgpu.Layout.WGMMA,
                              optimized=False)
            return _merge_state(carry, (part, m_s, l_s))

        carry = (plgpu.layout_cast(jnp.full((BLOCK_Q, h), 0, jnp.float32), plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), red),
                 plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32), red))
        out, lse = _finalize(*lax.fori_loop(c0, c1, body, carry), rounded=True)
        lse_smem[...] = lse
        o_smem[...] = out.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, heads, rows, h), dtype),
                  jax.ShapeDtypeStruct((b, heads, rows), jnp.float32)),
        grid=(heads, rows // BLOCK_Q, b),
        grid_names=("heads", "q_seq", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(acc, m, l, rng64)


def _pad_to(x, axis, size):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def forward(q, k, v, q_positions, kv_lengths, *, causal, sliding_window, soft_cap, scale,
            layout=None, compute_wgs=None, steps=None, value_splits=None, splits=None,
            split_parallel=None):
    """Public-layout attention through the kernel: ``q [B, T, N, H]``, ``k, v [B, S, K, H]``,
    ``q_positions [B, T]``, ``kv_lengths [B]`` (checked by the caller). Returns
    ``(o [B, T, N, H], lse [B, T, N] float32)``. ``layout``: ``'tokens'``, ``'packed'`` or
    ``None`` (``default_layout(T)``); ``compute_wgs`` (1 or 2; ``None``: ``default_compute_wgs``),
    ``steps`` (K/V pipeline slots) and ``value_splits`` (see ``mosaic_attention_call``; ``None``:
    ``default_value_splits``); none of them changes the bits. ``splits`` (``None``: ``SPLITS``):
    the order with key splits (``True``) or without (``False``, sessions 10-22's order).
    ``split_parallel`` (``None``: ``default_split_parallel``): decode's split-parallel CTAs and
    ``merge_call`` instead of the one-kernel merge; the same bits (``default_split_parallel``).
    Traceable on any platform."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    hm = padded_head_dim(h)
    bk = block_k(hm)
    layout = default_layout(t) if layout is None else layout
    lo, hi = row_bounds(q_positions, kv_lengths, causal=causal, sliding_window=sliding_window)
    sp = max(bk, -(-s // bk) * bk)
    kp, vp = (_pad_to(_pad_to(a, 1, sp), 3, hm) for a in (k, v))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None; got {layout!r}")
    rows = t if layout == "tokens" else t * g
    wgs = default_compute_wgs(layout, rows) if compute_wgs is None else compute_wgs
    if wgs not in (1, 2):
        raise ValueError(f"compute_wgs must be 1, 2 or None; got {compute_wgs!r}")
    cta = wgs * BLOCK_Q
    if layout == "tokens":
        rp = -(-t // cta) * cta
        qx = _pad_to(_pad_to(q, 1, rp), 3, hm)
        lo, hi = (_pad_to(a, 1, rp) for a in (lo, hi))    # padding rows: the empty interval [0, 0)
    else:
        qx = pack_rows(q, kh, hm, row_block=cta)
        rp = qx.shape[2]
        lo, hi = (pack_row_ints(a, g, rp) for a in (lo, hi))   # padding rows: [0, 0)
    rng = block_ranges(lo, hi, rows, bk, cta)
    splits = SPLITS if splits is None else bool(splits)
    ns = num_splits(sp) if splits else 1
    if split_parallel is None:
        split_parallel = default_split_parallel(layout, wgs, ns)
    if split_parallel and (layout != "packed" or not splits):
        raise ValueError("split_parallel needs layout='packed' and splits=True")
    ctas = rng.shape[0] * rng.shape[1] * (n if layout == "tokens" else kh) * (ns if split_parallel else 1)
    if value_splits is None:
        value_splits = default_value_splits(hm, ctas, wgs)
    kw = dict(layout=layout, scale=scale, soft_cap=soft_cap, block_kv=bk, steps=steps, compute_wgs=wgs,
              value_splits=value_splits, splits=splits)
    if split_parallel:
        acc, m, l = mosaic_attention_call(qx, kp, vp, lo, hi, rng, split_parallel=True, **kw)
        o, lse = merge_call(acc, m, l, block_ranges(lo, hi, rows, bk, BLOCK_Q), dtype=q.dtype, block_kv=bk)
    else:
        o, lse = mosaic_attention_call(qx, kp, vp, lo, hi, rng, **kw)
    if layout == "tokens":
        return o[:, :t, :, :h], lse[:, :, :t].transpose(0, 2, 1)
    return unpack_rows(o, t, n, h), unpack_row_scalars(lse, t, n)
