"""Batch-invariant attention: prefill, chunked prefill and KV-cache decode with one reduction order.

Layout: ``q [B, T, N, H]``, ``k, v [B, S, K, H]`` (like ``jax.nn.dot_product_attention``), ``N`` a
multiple of ``K``; ``G = N // K`` query heads share one KV head.

Rows and masks
--------------
The kernels work on *rows*: for batch element ``b`` and KV head ``h`` the ``T * G`` (token, query
head) pairs are packed as row ``r = t * G + g`` (``pack_rows``), padded to a multiple of
``ATTN_BLOCK_Q`` (= 64) and processed 64 rows at a time. Every row carries its own key interval
``[lo, hi)`` (``row_bounds``), which encodes every mask:

* key ``j`` has absolute position ``j``; query ``t`` has absolute position ``q_positions[b, t]``;
* causal: ``j <= pos``; sliding window ``w`` (Gemma 2/3 convention, the ``w`` most recent
  positions *including the query itself*): ``pos - w < j``; without ``causal`` the window is
  symmetric, ``|pos - j| < w``;
* ``j < kv_lengths[b]`` (keys at or beyond the length never reach a result, so garbage or NaN in
  an unused cache area cannot leak: see ``_load_kv_block``).

Rows with an empty interval (padding rows, a query before every valid key) produce exactly 0.

Non-finite inputs follow IEEE arithmetic *restricted to the row's interval*: a NaN logit at a valid
key makes the row NaN; a NaN/inf value at a valid key gives NaN/inf in that output column; keys
outside the interval (future keys, outside the window, past the length) never touch the row, not
even as ``0 * NaN`` inside the ``p @ v`` dot (``_split_state``: a split whose accumulator comes
out non-finite is folded again with ``_add_pv``'s guarded dots, which zero the non-finite values
and count them exactly per row; for finite values both folds give the same bits). So decode,
whose last split may hold a cache area past its length, agrees with prefill also for non-finite
caches (``_add_pv`` says what keeps the two folds' bits equal, and how session 6's exception at
head dims 128/256 was fixed; ``test_gpu_guarded_fold_equals_plain_fold_head_dims_128_256``).
(A valid key whose ``p`` underflowed to exactly 0 still propagates its NaN/inf.)

Reduction order (the product; see also ``pallas_kernels/order.py``)
-------------------------------------------------------------------
* KV blocks lie on an absolute grid: block ``j`` = keys ``[j * 64, (j + 1) * 64)``
  (``ATTN_BLOCK_K``), grouped in splits of ``ATTN_SPLIT_K`` (= 1024) keys: split ``c`` = keys
  ``[c * 1024, (c + 1) * 1024)`` = blocks ``16 c .. 16 c + 15``. Both grids are anchored at key 0.
* The softmax state of a row is ``(m, l, acc)`` (running max, running sum, unnormalised
  ``[H]`` output), all float32; the empty state is ``(-inf, 0, 0)``.
* Within a split: starting from the empty state, the split's blocks are folded in ascending ``j``
  by ``_block_step``: ``s = (q . k) * scale`` (f32 accumulation; f32 inputs at full precision),
  ``s = cap * tanh(s / cap)`` with a soft cap, ``s = -inf`` outside the row's interval;
  ``m' = max(m, max_j s)``; ``p = exp(s - m')`` (0 outside the interval); ``alpha = exp(m - m')``;
  ``l' = alpha * l + sum_j p``; ``acc' = acc * alpha + p @ v`` (``p`` cast to ``v``'s dtype for
  bf16/f16). A block with no valid key for the row leaves its state *bitwise unchanged*
  (``alpha = 1``, ``p = 0``: ``acc * 1 + 0 = acc``; ``_block_step`` says why no select is needed),
  so skipping such blocks is exact.
* Split states are merged into the running total in ascending ``c`` by ``_merge_states``:
  ``m' = max(m, m_c)``, ``acc' = acc * exp(m - m') + acc_c * exp(m_c - m')``, ``l`` likewise; an
  empty split leaves the total bitwise unchanged and an empty total takes the split state verbatim,
  so empty splits (skipped, or beyond the row's keys) are exact no-ops and ``-inf`` never makes NaN.
* ``out = acc / l`` (exactly 0 where the state is empty), cast to ``q``'s dtype;
  ``lse = m + log(l)`` (``-inf`` when empty) is kept for the backward pass.

Prefill (``attention_fwd_call``) does all of this in one kernel: a split-local state and a total
state live in registers, merged at split boundaries; blocks and splits outside the q block's union
of intervals are skipped. Decode (``decode_call``) runs one program per split (its state written to
HBM, for the real rows of the q block only), then a second Pallas kernel merges the splits in
ascending order with the *same* ``_merge_states``/``_finalize`` code (a cache of one split merges
and finalizes in the split's program, as prefill does), so prefill and decode run the
same instruction sequence per row (never an XLA merge on one path and a Pallas merge on the other:
XLA's and Triton's ``exp`` differ in bits). For the same reason prefill may run through the decode
kernels instead (``prefill_call``, for the head dims in ``PREFILL_SPLIT_PARALLEL_HEAD_DIMS``: one
program per (q block, split) with a single split state in registers, each q block storing and
merging only the splits its rows touch) and give the same output and ``lse`` bits. Every in-kernel reduction (``max``/``sum`` over the 64 keys of a block, the
dots) has a fixed shape (a ``[64, Hp]`` q tile in every kernel), and ``gpu_config`` gives one
Triton configuration per head dim (decode may differ only in warps and pipeline stages, which were
measured not to change bits), so the reduction trees are the same for every call. Consequently a row's
result depends only on its ``q``, its key interval and the keys in it: not on the other rows of its
q block, the batch, ``max_len``/padding, or how many blocks lie beyond its valid range.

Backward (``attention_bwd_call``): two Pallas kernels, deterministic run to run (no atomics). The dQ
kernel (one program per q block) recomputes ``p = exp(s - lse)`` and walks the KV blocks in
ascending order (also writing ``delta = rowsum(o * do)``); the dK/dV kernel (one program per KV
block) walks the q blocks in ascending order, skipping q blocks that cannot see the KV block. GQA
sums over the ``G`` heads of a KV head happen inside the dK/dV kernel (they are rows of the same q
blocks).

``attention_reference`` is a plain-JAX version with the same rows, blocks, splits and merge code (on
CPU it reproduces the interpret-mode bits); ``attention_f64_reference`` is the float64 yardstick.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels._rows import masked_load, masked_store
from pallas_kernels.order import ATTN_BLOCK_K, ATTN_BLOCK_Q, ATTN_SPLIT_K

BLOCK_Q = ATTN_BLOCK_Q
BLOCK_K = ATTN_BLOCK_K
BLOCKS_PER_SPLIT = ATTN_SPLIT_K // ATTN_BLOCK_K
_BIG = 2 ** 30  # larger than any key index; positions and windows are clipped to +-_BIG

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
#: Dtypes whose decode kernels were measured bit-neutral under more warps/stages and value splits
#: (tensor-core dots; float32's FMA-dot kernels were not checked).
_DECODE_TUNED_DTYPES = (jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------------------------
# Configuration


def gpu_config(head_dim: int, kernel: str = "prefill", dtype=None) -> tuple[int, int]:
    """(num_warps, num_stages) of an attention kernel for this (padded) head dim, on the GPU.

    The q tile is always ``[64, Hp]`` and the score tile ``[64, 64]``, whatever the kernel:

    * head_dim <= 64: 4 warps, 3 stages;
    * head_dim <= 128: 4 warps, 2 stages;
    * larger: 4 warps, 1 stage (3 stages exceed the H100's shared memory at head_dim 256), except
      the decode kernels (``kernel="decode"``: split and merge) for bf16/f16, which use 8 warps and
      2 stages.

    What may vary and what may not. The warp count and the pipeline depth were measured not to
    change any bit on the H100; the *height of the q tile* does (see below), so it is the same
    64 rows in every kernel:

    * warps: until session 4 head dims above 64 used 8 warps. 4 warps gave bitwise the same outputs
      (prefill, masks, soft-cap, decode; ``test_gpu_warp_count_does_not_change_bits``) and
      1.4-1.6x faster prefill (run s4-4, ``results/README.md``); the 11 output hashes of
      ``scripts/output_hashes.py`` did not move (run s4-5).
    * decode at head dim 256 is latency-bound (a few used rows, 32 programs at batch 8): 8 warps and
      2 stages halve the registers per thread for the ``[64, 256]`` accumulator and prefetch the
      next K/V block. Run s6-3: the same bits as 4 warps / 1 stage for bf16 and f16 at head dims
      128 and 256 (soft-cap, window, NaN/inf past the lengths, 3 tokens;
      ``test_gpu_decode_config_does_not_change_bits``), and 1.32x faster at the gemma2_2b shape
      (B8, cache 576: 64.7 -> 48.9 us), 1.16x at B64, 1.51x at B8 cache 8192. float32 keeps
      4 warps / 1 stage: its f32 FMA-dot kernels take minutes to compile on the GPU, which left
      their check out of run s6-3. At head dim 128 the same change was slower (77 -> 88 us).
    * q-tile height, upwards: prefill with 128-row tiles (8 warps, 1 or 2 stages;
      ``attention_fwd_call(block_q=128, config=...)``) gave the 64-row tile's bits in every case of
      run s10-2 (``test_gpu_prefill_q_tile_does_not_change_bits``) but was not faster (0.875 vs
      0.94-1.06 ms at B1 T8192 H128 on the H200), so prefill keeps 64 rows.
    * q-tile height, downwards: a 16-row decode tile was tried in session 5 and again in session 6 (runs
      s6-1/s6-2, with 1, 2 and 4 warps) and reverted: float32 matched prefill with 1 or 2 warps,
      but bf16/f16 had 1-2 elements in ~25,000 differ with every warp count, so the tensor-core
      dot of a 16-row tile (``mma.sync``) and of a 64-row tile (``wgmma``) are not interchangeable.
    * warps, downwards: **fewer than 4 warps is not bit-neutral.** Run s15-1 (H200) swept the decode
      kernel at B64, cache 768, head dim 256 (256-column value tiles): 2 warps gave different bits
      (and 3.8-5.8 ms against 136 us), most likely because ``wgmma`` needs a whole warpgroup
      (4 warps) and with 2 Triton emits another dot (not checked in the PTX). 4 and 8 warps gave
      the same bits. At 64 value columns 2 warps kept the bits but were 2.4x slower. So the configs
      here never go below 4 warps, and a change to one is a bit change until a GPU run shows
      otherwise.
    """
    hp = padded_head_dim(head_dim)
    if hp <= 64:
        return 4, 3
    if hp <= 128:
        return 4, 2
    if kernel == "decode" and dtype is not None and jnp.dtype(dtype) in _DECODE_TUNED_DTYPES:
        return 8, 2
    return 4, 1


def padded_head_dim(head_dim: int) -> int:
    """Head dims are zero-padded to a power of two >= 16 (Triton dot/load constraint)."""
    return max(16, pl.next_power_of_2(int(head_dim)))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Static parameters of one attention call (hashable: used as a jit / custom_vjp static)."""
    scale: float
    soft_cap: float | None
    backend: str


# ----------------------------------------------------------------------------------------------
# Rows: packing of (token, query head) pairs and their key intervals (plain XLA, integer/exact)


def default_q_positions(batch: int, t: int, s: int):
    """Default query positions: ``arange(T) + (S - T)`` (bottom-right aligned: the queries are the
    last ``T`` of the ``S`` key positions; ``arange(T)`` in the usual ``T == S`` case)."""
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (batch, t))


def row_bounds(q_positions, kv_lengths, *, causal: bool, sliding_window: int | None):
    """Per-token key interval ``[lo, hi)`` (int32 ``[B, T]`` each); empty intervals are ``[0, 0)``."""
    pos = jnp.clip(q_positions.astype(jnp.int32), -_BIG, _BIG)
    kvl = kv_lengths.astype(jnp.int32)[:, None]
    w = None if sliding_window is None else min(int(sliding_window), _BIG)
    lo = jnp.zeros_like(pos) if w is None else jnp.maximum(pos - (w - 1), 0)
    if causal:
        hi = jnp.minimum(pos + 1, kvl)
    elif w is None:
        hi = jnp.broadcast_to(kvl, pos.shape)
    else:
        hi = jnp.minimum(pos + w, kvl)
    empty = hi <= lo
    return jnp.where(empty, 0, lo), jnp.where(empty, 0, hi)


def num_row_blocks(t: int, g: int, row_block: int = BLOCK_Q) -> int:
    return max(1, -(-(t * g) // row_block))


def pack_rows(x, num_kv_heads: int, hp: int, row_block: int = BLOCK_Q):
    """``[B, T, N, H]`` -> ``[B, K, Rp, Hp]``: row ``t * G + g`` of KV head ``h`` is query head
    ``h * G + g`` of token ``t``; rows padded to a multiple of ``row_block`` (64) and H to ``hp``
    with zeros."""
    b, t, n, h = x.shape
    g = n // num_kv_heads
    rp = num_row_blocks(t, g, row_block) * row_block
    x = x.reshape(b, t, num_kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * g, h)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rp - t * g), (0, hp - h)))


def unpack_rows(x, t: int, n: int, h: int):
    """Inverse of ``pack_rows``: ``[B, K, Rp, Hp]`` -> ``[B, T, N, H]``."""
    b, kh = x.shape[:2]
    g = n // kh
    x = x[:, :, :t * g, :h].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, t, n, h)


def pack_row_scalars(x, num_kv_heads: int, rp: int):
    """``[B, T, N]`` per-(token, head) values -> ``[B, K, Rp]`` packed rows (padding 0)."""
    b, t, n = x.shape
    g = n // num_kv_heads
    x = x.reshape(b, t, num_kv_heads, g).transpose(0, 2, 1, 3).reshape(b, num_kv_heads, t * g)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rp - t * g)))


def unpack_row_scalars(x, t: int, n: int):
    """Inverse of ``pack_row_scalars``: ``[B, K, Rp]`` -> ``[B, T, N]``."""
    b, kh = x.shape[:2]
    return x[:, :, :t * (n // kh)].reshape(b, kh, t, n // kh).transpose(0, 2, 1, 3).reshape(b, t, n)


def pack_row_ints(x, g: int, rp: int):
    """``[B, T]`` per-token ints -> ``[B, Rp]`` per-row (each token repeated G times, padding 0)."""
    b, t = x.shape
    x = jnp.repeat(x, g, axis=1)
    return jnp.pad(x, ((0, 0), (0, rp - t * g)))


def pad_kv(x, hp: int):
    """``[B, S, K, H]`` -> ``[B, Sp, K, Hp]`` with ``Sp`` a multiple of 64 (no copy when aligned)."""
    b, s, kh, h = x.shape
    sp = max(BLOCK_K, _round_up(s, BLOCK_K))
    if (sp, hp) == (s, h):
        return x
    return jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))


def prepare(q, k, v, q_positions, kv_lengths, *, causal, sliding_window, row_block: int = BLOCK_Q):
    """Everything the kernels take, from public-layout arrays: packed q, padded k/v, row ints.
    ``row_block``: the packed rows are padded to a multiple of it (1: not padded, for
    ``decode_call``, whose kernels read the last block's missing rows as this padding)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    hp = padded_head_dim(h)
    qp = pack_rows(q, kh, hp, row_block)
    rp = qp.shape[2]
    lo, hi = row_bounds(q_positions, kv_lengths, causal=causal, sliding_window=sliding_window)
    kvl = jnp.broadcast_to(kv_lengths.astype(jnp.int32)[:, None], (b, t))
    lo, hi, kvl = (pack_row_ints(a, g, rp) for a in (lo, hi, kvl))
    return qp, pad_kv(k, hp), pad_kv(v, hp), lo, hi, kvl


# ----------------------------------------------------------------------------------------------
# The per-row arithmetic, shared by every kernel and by the reference. Works on 2-D tiles
# (inside a kernel) and on tiles with leading batch dimensions (reference).


def _dot_nt(a, b, precision):
    """``a [..., M, D] . b [..., N, D] -> [..., M, N]`` in f32."""
    nb = a.ndim - 2
    bd = tuple(range(nb))
    return lax.dot_general(a, b, (((nb + 1,), (nb + 1,)), (bd, bd)), precision=precision,
                           preferred_element_type=jnp.float32)


def _dot_nn(a, b, precision):
    """``a [..., M, K] . b [..., K, N] -> [..., M, N]`` in f32."""
    nb = a.ndim - 2
    bd = tuple(range(nb))
    return lax.dot_general(a, b, (((nb + 1,), (nb,)), (bd, bd)), precision=precision,
                           preferred_element_type=jnp.float32)


def _dot_tn(a, b, precision):
    """``a [K, M]^T . b [K, N] -> [M, N]`` in f32 (2-D only; backward kernels)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _empty_state(lead_shape, hp):
    return (jnp.full(lead_shape, -jnp.inf, jnp.float32), jnp.zeros(lead_shape, jnp.float32),
            jnp.zeros(lead_shape + (hp,), jnp.float32))


def _logits(q, k, kidx, lo, hi, cfg: AttnConfig):
    """Masked logits ``[..., rows, 64]`` and the validity mask. ``kidx``: ``[64]`` absolute keys."""
    s = _dot_nt(q, k, _precision(q.dtype)) * cfg.scale
    if cfg.soft_cap is not None:
        s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
    valid = (kidx >= lo[..., None]) & (kidx < hi[..., None])
    return jnp.where(valid, s, -jnp.inf), valid


def _nan_max(a, b):
    """``maximum`` that propagates NaN on every backend (GPU ``max`` may drop it)."""
    return jnp.where((a != a) | (b != b), jnp.nan, jnp.maximum(a, b))


# Non-finite values are counted with one exact dot: every value gets a code (NaN 1, +inf 128,
# -inf 16384, finite 0; powers of two, exact in bf16/f16), ``valid @ code`` sums them per row in f32
# (at most 64 keys: exact below 2**24), and the counts are read back by integer division.
_NAN_CODE, _PINF_CODE, _NINF_CODE = 1.0, 128.0, 16384.0


def _add_pv(scaled, p, v, valid, guarded=True):
    """``scaled + p @ v`` where keys outside a row's interval never contribute, even as ``0 * NaN``
    (``scaled`` is the rescaled accumulator ``acc * alpha``).

    ``guarded=False`` is the plain fold (all-finite ``v``, the normal case). The guarded form runs
    the dot on ``v`` with its non-finite entries zeroed, and each (row, column) whose *valid* keys
    hold a non-finite value gets the IEEE result of adding them to ``scaled``: NaN for a NaN or for
    both infinities, else the infinity (or NaN, if ``scaled`` holds the opposite infinity). (A
    valid key whose ``p`` underflowed to 0 still counts: see the header.)

    Both forms add the dot's result *directly* to ``scaled``: Triton folds that add into the dot
    as its initial accumulator (``dot(p, v, acc * alpha)``), which rounds differently from adding
    a finished ``p @ v``. Session 6's guarded form fixed the dot's result up before the add, so
    at head dims 128/256 (bf16/f16) it gave other bits than the plain fold (H100, runs s6-7 and
    s7-2; not at head dim 64); with the add kept next to the dot, both forms give the same bits
    for finite values (run s7-2: decode with NaN/inf past the lengths and prefill with NaN at a
    future key both equal the clean results at head dims 128 and 256).
    """
    prec = _precision(v.dtype)
    if not guarded:
        return scaled + _dot_nn(p.astype(v.dtype), v, prec)
    finite = jnp.abs(v) < jnp.inf   # False for NaN and +-inf
    fused = scaled + _dot_nn(p.astype(v.dtype), jnp.where(finite, v, jnp.zeros_like(v)), prec)
    codes = (_NAN_CODE, _PINF_CODE, _NINF_CODE)
    cnt = _dot_nn(valid.astype(v.dtype), nonfinite_code(v, codes), prec)   # exact small integers
    special = apply_nonfinite_counts(jnp.zeros_like(fused), cnt, codes)     # 0, +-inf or NaN
    return jnp.where(special != 0, scaled + special, fused)


def nonfinite_code(v, codes):
    """Per element of ``v``: ``codes[0]`` for NaN, ``codes[1]`` for +inf, ``codes[2]`` for -inf,
    0 for finite values, in ``v``'s dtype (the codes are powers of two: exact)."""
    nan_c, pinf_c, ninf_c = codes
    return jnp.where(v != v, nan_c, jnp.where(v == jnp.inf, pinf_c,
                                              jnp.where(v == -jnp.inf, ninf_c, 0.0))).astype(v.dtype)


def apply_nonfinite_counts(pv, cnt, codes):
    """``pv`` with the IEEE result where ``cnt = valid @ nonfinite_code(v)`` counts non-finite
    values among a row's valid keys: NaN for a NaN or both infinities, else the infinity."""
    _, pinf_c, ninf_c = codes
    n_ninf = jnp.floor(cnt / ninf_c)
    rest = cnt - n_ninf * ninf_c
    n_pinf = jnp.floor(rest / pinf_c)
    n_nan = rest - n_pinf * pinf_c
    out = jnp.where(n_pinf > 0, jnp.inf, pv)
    out = jnp.where(n_ninf > 0, -jnp.inf, out)
    return jnp.where((n_nan > 0) | ((n_pinf > 0) & (n_ninf > 0)), jnp.nan, out)


#: A/B switches of ``_block_step`` (read at trace time; for ``benchmarks/block_step_selects.py`` and
#: ``test_block_step_selects_do_not_change_bits``). ``BLOCK_STEP_SELECT_ACC``: select the old
#: ``[rows, Hp]`` accumulator back for rows with no valid key in the block (it keeps the old and the
#: new accumulator alive together). ``BLOCK_STEP_SELECT_P``: select ``p = 0`` outside the interval
#: (``s`` is already ``-inf`` there). Sessions 1-19 ran both. Neither changes a finite result
#: (``_block_step`` says why), and on the H100 (run s20-1) dropping both gave the same bits at every
#: benchmark shape (9 prefill, 5 decode), passed the test for bf16 and f16, and was faster: prefill
#: 1.11-1.22x at head dims 128/256 (B8 T8192 H128 7.05 -> 6.09 ms), 1.38x at 64; decode
#: 1.04-1.25x (B64 8k: 79 -> 83% of copy). Dropping the accumulator select alone gained at most
#: 1.07x: the per-element select of ``p`` was the larger cost. So both are off. Run s20-2, with them
#: off: 26 of 26 output hashes unchanged (the float32 tiny model's among them), the attention tests
#: 56 passed; the float32 case of the select test did not finish in that call.
BLOCK_STEP_SELECT_ACC = False
BLOCK_STEP_SELECT_P = False


def _block_step(state, s, valid, v, guarded=True):
    """Fold one KV block into a row state. Rows with no valid key keep their state bitwise.

    A NaN logit at a valid key makes the row's state NaN (so the output is NaN, as in IEEE
    arithmetic). GPU ``max`` reductions drop NaN, so NaN is read from the row sum instead, which
    propagates it: no extra reduction per block.

    Why the state of a row with no valid key in the block is unchanged even without the selects
    (``BLOCK_STEP_SELECT_ACC`` / ``_P`` off): its ``m_blk`` is ``-inf``, so ``m_new = m``; if ``m``
    is finite, ``alpha = exp(0) = 1`` and every ``p`` is ``exp(-inf) = 0``, so ``l * 1 + 0 = l`` and
    ``acc * 1 + sum(0 * v) = acc`` exactly (the accumulator starts at +0 and IEEE sums never turn
    +0 into -0, so adding +-0 cannot flip a zero's sign either); if ``m`` is ``-inf`` (nothing yet)
    the state stays ``(-inf, 0, +0)``. A non-finite value at such a key makes ``0 * v`` NaN in the
    plain fold, which sends the split through the guarded fold (``_split_state``), whose counts use
    ``valid``. Only a NaN row (NaN whatever the selects) computes its NaN differently, and a block
    whose valid keys all have the logit ``-inf`` (infinite inputs only): the selecting form skipped
    it, this one folds it like any block, so a NaN/inf value at such a key propagates, as the header
    says of a valid key whose ``p`` is 0.
    """
    m, l, acc = state
    m_blk = jnp.max(s, axis=-1)                  # s is -inf outside the interval
    m_new = _nan_max(m, m_blk)
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)    # keeps NaN
    p = jnp.exp(s - m_use[..., None])
    if BLOCK_STEP_SELECT_P:
        p = jnp.where(valid, p, 0.0)
    alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
    l_new = alpha * l + jnp.sum(p, axis=-1)
    row_nan = l_new != l_new                     # a NaN logit (or a NaN state) in this row
    any_valid = (m_blk > -jnp.inf) | row_nan
    m_new = jnp.where(row_nan, jnp.nan, m_new)
    acc_new = _add_pv(acc * alpha[..., None], p, v, jnp.broadcast_to(valid, p.shape), guarded)
    if BLOCK_STEP_SELECT_ACC:
        acc_new = jnp.where(any_valid[..., None], acc_new, acc)
    return jnp.where(any_valid, m_new, m), jnp.where(any_valid, l_new, l), acc_new


def _merge_states(total, part, widen=lambda x, hp: x[..., None]):
    """Merge a split state into the running total (ascending split order is the caller's job).

    ``widen(x, hp)`` turns a per-row value into the accumulator's shape (the TPU lowering keeps
    per-row values replicated across lanes and passes its own)."""
    m, l, acc = total
    mc, lc, accc = part
    hp = acc.shape[-1]
    t_empty = m == -jnp.inf
    c_empty = mc == -jnp.inf
    both = jnp.logical_not(t_empty | c_empty)
    m_new = _nan_max(m, mc)
    m_use = jnp.where(both, m_new, 0.0)
    a = jnp.where(both, jnp.exp(jnp.where(both, m, 0.0) - m_use), 0.0)
    b = jnp.where(both, jnp.exp(jnp.where(both, mc, 0.0) - m_use), 0.0)
    l_new = l * a + lc * b
    acc_new = acc * widen(a, hp) + accc * widen(b, hp)
    m_out = jnp.where(c_empty, m, jnp.where(t_empty, mc, m_new))
    l_out = jnp.where(c_empty, l, jnp.where(t_empty, lc, l_new))
    acc_out = jnp.where(widen(c_empty, hp), acc, jnp.where(widen(t_empty, hp), accc, acc_new))
    return m_out, l_out, acc_out


def _finalize(state):
    """``(out f32, lse)``: ``acc / l``, exactly 0 (and lse = -inf) for an empty state."""
    m, l, acc = state
    empty = m == -jnp.inf
    l_safe = jnp.where(empty, 1.0, l)
    out = jnp.where(empty[..., None], 0.0, acc / l_safe[..., None])
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
    return out, lse


def _block_range(lo, hi):
    """``[first, last + 1)`` KV block touched by any row of a q block (empty: ``[BIG/64, 0)``)."""
    ne = hi > lo
    start = jnp.min(jnp.where(ne, lo, _BIG))
    end = jnp.max(jnp.where(ne, hi, 0))
    return lax.div(start, BLOCK_K), lax.div(end + (BLOCK_K - 1), BLOCK_K)


def _load_kv_block(k_ref, v_ref, j, kv_len=None):
    """Keys ``[j*64, (j+1)*64)`` of the (whole-sequence) k/v refs, and their absolute indices.

    With ``kv_len`` (backward kernels) rows ``>= kv_len`` are set to 0: there ``dp = do . v`` would
    carry a NaN of an unused cache area into ``ds = p * (dp - delta)`` as ``0 * NaN``. The forward
    kernels pass no ``kv_len`` for bf16/f16 (f32: see ``_split_state``) and feed the loaded tiles
    straight to the dots (a select between the load and the dot costs a register round trip and
    defeats Triton's load pipelining: 1.2x prefill, 1.1x decode on the H100, run s4-2). That is
    exact: a key at or past the length is
    outside every row's interval, so its logit is replaced by ``-inf`` and its ``p`` is exactly 0;
    a finite value there enters ``p @ v`` only as exact zero products, and a non-finite one makes
    the split's accumulator non-finite, which sends the split through the guarded fold of
    ``_split_state``, which never reads values outside the row's interval.
    """
    start = pl.multiple_of(j * BLOCK_K, BLOCK_K)
    kidx = start + jnp.arange(BLOCK_K, dtype=jnp.int32)
    k = k_ref[pl.ds(start, BLOCK_K), :]
    v = v_ref[pl.ds(start, BLOCK_K), :]
    if kv_len is None:
        return k, v, kidx
    ok = (kidx < kv_len)[:, None]
    return jnp.where(ok, k, jnp.zeros_like(k)), jnp.where(ok, v, jnp.zeros_like(v)), kidx


def _split_state(q, k_ref, v_ref, lo, hi, kv_len, b0, b1, cfg):
    """Online softmax over blocks ``[b0, b1)`` (ascending) from the empty state.

    The blocks are first folded with plain ``p @ v`` dots. Only if the split's accumulator comes out
    non-finite (a NaN/inf value somewhere, or an overflow) is the split folded again with the
    guarded dots of ``_add_pv``, which keep every row exact. One check per split instead of one
    per block; for finite values both folds give the same bits, so which one ran never shows
    (bf16/f16 on the H100 at head dims 64, 128 and 256: run s7-2 and the GPU tests).

    float32 keys/values keep the ``kv_len`` select on load (``_load_kv_block``): Triton's f32 dot
    gave 1-ulp different results for a value tile fed straight from the load and one fed through a
    select (H100, run s4-5), and the guarded fold feeds ``v`` through a select, so without it a
    decode whose cache holds NaN past its length (guarded fold) would differ from prefill (plain
    fold). (That f32 difference may have had the cause ``_add_pv`` describes; it was not re-measured.)
    """
    mask_len = kv_len if k_ref.dtype == jnp.float32 else None

    def fold(guarded):
        def body(j, state):
            k, v, kidx = _load_kv_block(k_ref, v_ref, j, mask_len)
            s, valid = _logits(q, k, kidx, lo, hi, cfg)
            return _block_step(state, s, valid, v, guarded)
        return lax.fori_loop(b0, b1, body, _empty_state((q.shape[0],), v_ref.shape[-1]))

    state = fold(False)
    acc_finite = jnp.min(jnp.where(jnp.abs(state[2]) < jnp.inf, 1, 0)) > 0
    return lax.cond(acc_finite, lambda: state, lambda: fold(True))


# ----------------------------------------------------------------------------------------------
# Forward kernels


def _fwd_kernel(lo_ref, hi_ref, kvl_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg):
    lo, hi = lo_ref[...], hi_ref[...]
    kv_len = jnp.max(kvl_ref[...])
    q = q_ref[...]
    blk_start, blk_end = _block_range(lo, hi)
    split_start = lax.div(blk_start, BLOCKS_PER_SPLIT)
    split_end = lax.div(blk_end + (BLOCKS_PER_SPLIT - 1), BLOCKS_PER_SPLIT)

    def split_body(c, total):
        b0 = jnp.maximum(blk_start, c * BLOCKS_PER_SPLIT)
        b1 = jnp.minimum(blk_end, (c + 1) * BLOCKS_PER_SPLIT)
        part = _split_state(q, k_ref, v_ref, lo, hi, kv_len, b0, b1, cfg)
        return _merge_states(total, part)

    total = lax.fori_loop(split_start, split_end, split_body,
                          _empty_state((q.shape[0],), q.shape[-1]))
    out, lse = _finalize(total)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _compiler_params(be, hp, kernel="prefill", dtype=None):
    if be != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton
    nw, ns = gpu_config(hp, kernel, dtype)
    return pltriton.CompilerParams(num_warps=nw, num_stages=ns)


def _check_backend(be):
    if be in ("tpu", "tpu-interpret"):
        raise NotImplementedError(f"backend {be!r}: the TPU attention lowering is not implemented yet")


def _row_spec(block_q=BLOCK_Q):
    return pl.BlockSpec((None, block_q), lambda b, h, i, *_: (b, i))


def _qrow_spec(hp, block_q=BLOCK_Q):
    return pl.BlockSpec((None, None, block_q, hp), lambda b, h, i, *_: (b, h, i, 0))


def _kv_full_spec(sp, hp):
    return pl.BlockSpec((None, sp, None, hp), lambda b, h, *_: (b, 0, h, 0))


def attention_fwd_call(qp, kp, vp, lo, hi, kvl, cfg: AttnConfig, *, block_q: int = BLOCK_Q,
                       config: tuple[int, int] | None = None):
    """Prefill kernel on prepared operands (see ``prepare``). Returns ``(o [B,K,Rp,Hp], lse [B,K,Rp])``.

    ``block_q``: rows per program (a multiple of ``BLOCK_Q``; rows are padded to a multiple of it
    here and the padding sliced off); ``config``: ``(num_warps, num_stages)`` instead of
    ``gpu_config``'s. Both are GPU tuning knobs for tests and benchmarks: a row's result does not
    depend on the other rows of its program (see the header)."""
    be = _backend.resolve(cfg.backend)
    _check_backend(be)
    b, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    if block_q % BLOCK_Q:
        raise ValueError(f"block_q must be a multiple of {BLOCK_Q}, got {block_q}")
    rpp = _round_up(rp, block_q)
    if rpp != rp:   # padding rows have the empty interval [0, 0): output 0, never read back
        qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rpp - rp), (0, 0)))
        lo, hi, kvl = (jnp.pad(a, ((0, 0), (0, rpp - rp))) for a in (lo, hi, kvl))
    params = _compiler_params(be, hp)
    if config is not None and be == "gpu":
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=config[0], num_stages=config[1])
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, kh, rpp // block_q),
        in_specs=[_row_spec(block_q), _row_spec(block_q), _row_spec(block_q), _qrow_spec(hp, block_q),
                  _kv_full_spec(sp, hp), _kv_full_spec(sp, hp)],
        out_specs=[_qrow_spec(hp, block_q), pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                   jax.ShapeDtypeStruct((b, kh, rpp), jnp.float32)],
        interpret=_backend.interpret_arg(be),
        compiler_params=params,
        name="detjax_attention_fwd",
    )(lo, hi, kvl, qp, kp, vp)
    if rpp != rp:
        o, lse = o[:, :, :rp], lse[:, :, :rp]
    return o, lse


def _state_rows_mask(rows):
    """``[64]``: which rows of this program's q block are below ``rows`` (the rows the decode
    state arrays hold; ``None``: every row)."""
    if rows is None:
        return None
    return pl.program_id(2) * BLOCK_Q + jnp.arange(BLOCK_Q, dtype=jnp.int32) < rows


def _load_decode_rows(lo_ref, hi_ref, kvl_ref, q_ref, rows, gpu, overhang):
    """A decode program's row ints and q tile. ``overhang``: the packed arrays hold only the real
    rows (``DECODE_UNPADDED_ROWS``; the last block overhangs them), and the rows past ``rows`` read
    as the padding ``prepare`` writes in the padded layout: q 0, the empty interval ``[0, 0)``,
    length 0 (which never raises the block's ``max`` of the lengths). So both layouts feed the
    kernel the same values."""
    if not overhang:
        return lo_ref[...], hi_ref[...], jnp.max(kvl_ref[...]), q_ref[...]
    mask = _state_rows_mask(rows)
    lo = masked_load(lo_ref, mask, gpu, 0)
    hi = masked_load(hi_ref, mask, gpu, 0)
    kv_len = jnp.max(masked_load(kvl_ref, mask, gpu, 0))
    return lo, hi, kv_len, masked_load(q_ref, mask[:, None], gpu, 0.0)


def _store_decode_out(o_ref, out, mask, gpu, overhang):
    """Rows past ``rows`` are written as 0 in the padded layout; an output holding only the real
    rows (``overhang``) drops them (masked store)."""
    if mask is not None:
        out = jnp.where(mask[:, None], out, 0.0)
    masked_store(o_ref, out.astype(o_ref.dtype), mask[:, None] if overhang else None, gpu)


def _store_lse(lse_ref, lse, mask, gpu, overhang):
    """The row log-sum-exps (``decode_call(..., with_lse=True)``; ``lse_ref`` is ``()`` without),
    ``-inf`` for rows past ``rows`` as the empty state gives; dropped past an overhang."""
    if not lse_ref:
        return
    if mask is not None:
        lse = jnp.where(mask, lse, -jnp.inf)
    masked_store(lse_ref[0], lse, mask if overhang else None, gpu)


def _split_range(lo, hi):
    """``[first, last + 1)`` split touched by any row of a q block (the splits prefill merges)."""
    blk_start, blk_end = _block_range(lo, hi)
    return (lax.div(blk_start, BLOCKS_PER_SPLIT),
            lax.div(blk_end + (BLOCKS_PER_SPLIT - 1), BLOCKS_PER_SPLIT))


def _decode_split_kernel(lo_ref, hi_ref, kvl_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, cfg,
                         rows, gpu, overhang=False, ranged=False):
    """One (q block, split) state. ``ranged``: a split outside the q block's ``_split_range`` (empty
    for every row) stores nothing; the merge kernel then never reads it."""
    c = pl.program_id(3)
    lo, hi, kv_len, q = _load_decode_rows(lo_ref, hi_ref, kvl_ref, q_ref, rows, gpu, overhang)
    blk_start, blk_end = _block_range(lo, hi)
    b0 = jnp.maximum(blk_start, c * BLOCKS_PER_SPLIT)
    b1 = jnp.minimum(blk_end, (c + 1) * BLOCKS_PER_SPLIT)
    m, l, acc = _split_state(q, k_ref, v_ref, lo, hi, kv_len, b0, b1, cfg)
    mask = _state_rows_mask(rows)
    wide = None if mask is None else mask[:, None]

    def store():
        masked_store(m_ref, m, mask, gpu)
        masked_store(l_ref, l, mask, gpu)
        masked_store(acc_ref, acc, wide, gpu)

    if not ranged:
        store()
        return
    s0, s1 = _split_range(lo, hi)
    pl.when((c >= s0) & (c < s1))(store)


def _decode_single_kernel(lo_ref, hi_ref, kvl_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, cfg, rows,
                          gpu, overhang=False):
    """Decode whose cache fits one split (``S <= ATTN_SPLIT_K``): the split state, merged into the
    empty total and finalized in the same program, as the prefill kernel does (its fold over splits
    runs ``_merge_states(empty, part)`` then ``_finalize`` for one split). The merge kernel would
    run the same two functions on the same values (the state is f32 in HBM, read back exactly), so
    the bits are the two-kernel path's; the state never goes to HBM and one launch is saved.
    Rows past ``rows`` (q padding) are written as 0, as the merge kernel's empty state gives."""
    lo, hi, kv_len, q = _load_decode_rows(lo_ref, hi_ref, kvl_ref, q_ref, rows, gpu, overhang)
    blk_start, blk_end = _block_range(lo, hi)
    b0 = jnp.maximum(blk_start, 0)
    b1 = jnp.minimum(blk_end, BLOCKS_PER_SPLIT)
    part = _split_state(q, k_ref, v_ref, lo, hi, kv_len, b0, b1, cfg)
    out, lse = _finalize(_merge_states(_empty_state((q.shape[0],), part[2].shape[-1]), part))
    _store_decode_out(o_ref, out, _state_rows_mask(rows), gpu, overhang)
    _store_lse(lse_ref, lse, _state_rows_mask(rows), gpu, overhang)


def _decode_merge_kernel(*refs, num_splits, rows, gpu, overhang=False, ranged=False):
    """Merge the split states in ascending order and finalize; refs ``[lo, hi,] m, l, acc, o[, lse]``.
    ``ranged`` (prefill through these kernels): merge only the q block's ``_split_range``, as the
    one-kernel prefill does; the splits outside it are empty for every row, and merging an empty
    state is an exact no-op, so the bits are those of merging all ``num_splits``."""
    if ranged:
        lo_ref, hi_ref, *refs = refs
    m_ref, l_ref, acc_ref, o_ref, *lse_ref = refs
    hp = acc_ref.shape[-1]
    mask = _state_rows_mask(rows)
    wide = None if mask is None else mask[:, None]

    def body(c, total):
        # rows past ``rows`` (q padding) read the empty state: they finalize to 0, as before
        part = (masked_load(m_ref.at[c], mask, gpu, -jnp.inf), masked_load(l_ref.at[c], mask, gpu, 0.0),
                masked_load(acc_ref.at[c], wide, gpu, 0.0))
        return _merge_states(total, part)

    total = _empty_state((BLOCK_Q,), hp)
    u = DECODE_MERGE_UNROLL if gpu else 1   # interpret mode: see DECODE_MERGE_UNROLL
    if ranged:
        c0, c1 = _split_range(lo_ref[...], hi_ref[...])
        total = lax.fori_loop(c0, c1, body, total)
    elif u <= 1:
        total = lax.fori_loop(0, num_splits, body, total)
    else:   # groups of u splits written out in order (Pallas' Triton lowering has no scan unroll)
        def group(g, t):
            for j in range(u):
                t = body(g * u + j, t)
            return t
        if num_splits // u:
            total = lax.fori_loop(0, num_splits // u, group, total)
        for c in range(num_splits - num_splits % u, num_splits):
            total = body(c, total)
    out, lse = _finalize(total)
    # padding rows finalize the empty state to 0; only an overhanging block needs the mask
    _store_decode_out(o_ref, out, mask if overhang else None, gpu, overhang)
    _store_lse(lse_ref, lse, mask, gpu, overhang)


#: On: decode packs only the real rows (``prepare(..., row_block=1)``) and its kernels read/write
#: the overhanging last q block with masks, instead of padding q and the row ints to 64 rows before
#: the kernels and slicing the output after them (small XLA kernels around every decode call). The
#: same values reach the same arithmetic; bitwise equal to the padded layout
#: (``test_decode_unpadded_rows_give_the_padded_bits``, interpret mode and compiled on the GPU).
#: **On by default since session 21**: on the H100 (run s21-1, ``benchmarks/decode_breakdown.py``)
#: the same bits as the padded layout at ragged lengths at 6 of 6 shapes (bf16, and f16 at one), and
#: 1.07-1.36x faster (B8 cache 8k: 63.7 -> 56.6 us, 70% -> 78% of copy; B64 8k: 85% -> 95%).
#: Off, the traced kernels are those of sessions 16-20 (the same bits).
DECODE_UNPADDED_ROWS = True

#: A cache of at most one split (``ATTN_SPLIT_K`` keys) decodes in one kernel
#: (``_decode_single_kernel``) instead of split + merge: the same functions on the same values, so
#: the same bits (a switch for the A/B benchmark, results/2026-12-04-h200/s15_1_*).
DECODE_FUSE_SINGLE_SPLIT = True

#: The decode merge kernel walks the splits in groups of this many, written out one after another
#: inside the loop body (1: one split per loop step, the form of sessions 2-20). The same merges in
#: the same order, so the same bits; written out, the loads of a group's states need not wait for
#: the previous merge (the merge is one program per q block: at batch 1 it is a chain of ``ns``
#: dependent loads). On the H100 (run s21-3, ``benchmarks/decode_breakdown.py --merge-only``) 4 and
#: 8 gave the bits of 1 at 8 of 8 shapes (bf16, f16, f32; ragged lengths) and
#: ``test_gpu_decode_merge_unroll_does_not_change_bits`` passed for all three dtypes; 8 was
#: 1.08-1.09x faster at batch 1 with one KV head (cache 32k: 36.9 -> 33.7 us; 8k: 24.1 -> 22.3 us),
#: 1.02x at B8 8k, the same elsewhere. 1 restores the loop of sessions 2-20 (the A/B's baseline).
#: GPU only: in interpret mode XLA:CPU fuses across the written-out merges and its float32 result
#: moved (1 element of 256 at a 2049-key cache in ``test_decode_equals_prefill_across_splits``), so
#: there the merge keeps one split per loop step, as the one-kernel prefill's merge does.
DECODE_MERGE_UNROLL = 8

#: Programs the decode split kernel aims for before it splits value columns (``decode_value_splits``):
#: twice the H100's 132 SMs.
DECODE_TARGET_PROGRAMS = 264


def decode_value_splits(hp: int, programs: int, dtype, backend: str = "gpu") -> int:
    """How many programs share the value columns of one (row block, KV split) in decode: ``E``
    programs each compute ``acc[:, e * Hp/E : (e + 1) * Hp/E]`` (and, redundantly, the same
    ``q . k``, ``m``, ``l``).

    A decode step at batch 8 has few (row block, split) pairs (32 for 4 KV heads and a cache under
    1024 keys), each walking its KV blocks in order, so most of the GPU idles. Splitting the
    columns of ``p @ v`` adds programs without touching the reduction order: every program runs the
    same ``q . k`` dot over the full head dim (same bits), and each column of ``p @ v`` is a dot over
    the same 64 keys whatever the dot's width. On the H100 (run s6-6) decode with E = 1, 2 and 4
    equalled prefill bitwise for bf16 and f16 at head dim 256
    (``test_gpu_decode_value_splits_do_not_change_bits``), and the 11 output hashes did not move;
    1.31x faster at the gemma2_2b shape at batch 8 (49.1 -> 37.5 us), 1.53x at batch 1. The price
    is re-reading ``K`` once per program, so columns are split only while the grid has fewer than
    ``DECODE_TARGET_PROGRAMS`` programs, into parts of at least 64 columns, bf16/f16 only (float32's
    FMA-dot kernels were not measured). GPU only: interpret mode (XLA's CPU dot) was not checked
    bitwise across widths, so it keeps E = 1. The split kernel takes ``gpu_config`` of its part's
    width (E = 4 at head dim 256: 64 columns, 4 warps, 3 stages)."""
    if backend != "gpu" or jnp.dtype(dtype) not in _DECODE_TUNED_DTYPES:
        return 1
    e = 1
    while hp // (2 * e) >= 64 and programs * 2 * e <= DECODE_TARGET_PROGRAMS:
        e *= 2
    return e


def decode_call(qp, kp, vp, lo, hi, kvl, cfg: AttnConfig, rows: int | None = None,
                with_lse: bool = False):
    """Split-parallel (flash-decoding) forward on prepared operands; bitwise equal to
    ``attention_fwd_call``'s output. Returns ``o [B, K, Rp, Hp]``.

    ``qp``'s rows (and ``lo``/``hi``/``kvl``'s) need not be padded to a multiple of ``BLOCK_Q``
    (``prepare(..., row_block=1)``): the last q block then overhangs them, its missing rows read as
    the padding (q 0, empty interval) and are not written back, so the output has ``qp``'s rows and
    no padding pass runs before or after the kernels (``DECODE_UNPADDED_ROWS``, on by default).

    ``rows``: how many packed rows are real (``T * G``; default all ``Rp``). The per-split states
    (``m``, ``l``, ``acc`` in float32, written by the split kernel and read by the merge kernel)
    are stored for these rows only: a decode step has ``G`` real rows of the 64 in its q block, and
    storing all 64 made the state traffic a quarter of the cache's own at 8k keys. Bit-neutral:
    the real rows' values are the same, and the padding rows read the empty state (output 0).

    ``with_lse``: also return the rows' log-sum-exps ``[B, K, Rp]`` (float32; ``-inf`` for empty
    rows), bitwise ``attention_fwd_call``'s (the same ``_finalize`` on the same state), so that
    ``prefill_call`` can run prefill through these kernels with the backward pass. Value columns
    are then not split (``E = 1``: every program would write the same ``lse``), and each q block
    stores and merges only the splits its rows touch (``ranged``: causal prefill leaves about half
    of the (q block, split) pairs empty; merging an empty state is an exact no-op, which is why the
    one-kernel prefill may skip them too)."""
    be = _backend.resolve(cfg.backend)
    _check_backend(be)
    gpu = be == "gpu"
    b, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    nq = -(-rp // BLOCK_Q)
    overhang = rp % BLOCK_Q != 0
    r = rp if rows is None else int(rows)
    if not 0 < r <= rp:
        raise ValueError(f"rows must lie in (0, {rp}], got {rows}")
    if overhang and r != rp:
        raise ValueError(f"packed rows not padded to a multiple of {BLOCK_Q} ({rp}) must all be real "
                         f"(rows={rows})")
    mrows = None if r == nq * BLOCK_Q else r
    ns = -(-sp // ATTN_SPLIT_K)
    ranged = with_lse
    if ranged and (overhang or mrows is not None):
        raise ValueError("with_lse (prefill) takes rows padded to a multiple of "
                         f"{BLOCK_Q}, all of them real (rows={rows}, packed rows {rp})")
    ne = 1 if with_lse else decode_value_splits(hp, b * kh * nq * ns, qp.dtype, be)
    hv = hp // ne
    o_shape = jax.ShapeDtypeStruct(qp.shape, qp.dtype)
    lse_shape = [jax.ShapeDtypeStruct((b, kh, rp), jnp.float32)] if with_lse else []
    lse_spec = [pl.BlockSpec((None, None, BLOCK_Q), lambda b, h, i, *_: (b, h, i))] if with_lse else []
    if ns == 1 and DECODE_FUSE_SINGLE_SPLIT:
        res = pl.pallas_call(
            functools.partial(_decode_single_kernel, cfg=cfg, rows=mrows, gpu=gpu, overhang=overhang),
            grid=(b, kh, nq, ne),
            in_specs=[_row_spec(), _row_spec(), _row_spec(), _qrow_spec(hp), _kv_full_spec(sp, hp),
                      pl.BlockSpec((None, sp, None, hv), lambda b, h, i, e: (b, 0, h, e))],
            out_specs=[pl.BlockSpec((None, None, BLOCK_Q, hv), lambda b, h, i, e: (b, h, i, e))]
            + lse_spec,
            out_shape=[o_shape] + lse_shape,
            interpret=_backend.interpret_arg(be),
            compiler_params=_compiler_params(be, hv, "decode", qp.dtype),
            name="detjax_decode_attention_single",
        )(lo, hi, kvl, qp, kp, vp)
        return tuple(res) if with_lse else res[0]
    # m and l are the same in every column part; each part writes its own copy (no shared writes)
    state_spec = pl.BlockSpec((None, None, None, None, BLOCK_Q), lambda b, h, i, c, e: (b, h, c, e, i))
    acc_spec = pl.BlockSpec((None, None, None, BLOCK_Q, hv), lambda b, h, i, c, e: (b, h, c, i, e))
    m, l, acc = pl.pallas_call(
        functools.partial(_decode_split_kernel, cfg=cfg, rows=mrows, gpu=gpu, overhang=overhang,
                          ranged=ranged),
        grid=(b, kh, nq, ns, ne),
        in_specs=[_row_spec(), _row_spec(), _row_spec(), _qrow_spec(hp), _kv_full_spec(sp, hp),
                  pl.BlockSpec((None, sp, None, hv), lambda b, h, i, c, e: (b, 0, h, e))],
        out_specs=[state_spec, state_spec, acc_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kh, ns, ne, r), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, ns, ne, r), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, ns, r, hp), jnp.float32)],
        interpret=_backend.interpret_arg(be),
        compiler_params=_compiler_params(be, hv, "decode", qp.dtype),
        name="detjax_decode_attention_split",
    )(lo, hi, kvl, qp, kp, vp)
    res = pl.pallas_call(
        functools.partial(_decode_merge_kernel, num_splits=ns, rows=mrows, gpu=gpu, overhang=overhang,
                          ranged=ranged),
        grid=(b, kh, nq),
        in_specs=[_row_spec(), _row_spec()] * ranged + [
                  pl.BlockSpec((None, None, ns, None, BLOCK_Q), lambda b, h, i: (b, h, 0, 0, i)),
                  pl.BlockSpec((None, None, ns, None, BLOCK_Q), lambda b, h, i: (b, h, 0, 0, i)),
                  pl.BlockSpec((None, None, ns, BLOCK_Q, hp), lambda b, h, i: (b, h, 0, i, 0))],
        out_specs=[_qrow_spec(hp)] + lse_spec,
        out_shape=[o_shape] + lse_shape,
        interpret=_backend.interpret_arg(be),
        compiler_params=_compiler_params(be, hp, "decode", qp.dtype),
        name="detjax_decode_attention_merge",
    )(*((lo, hi) if ranged else ()), m, l, acc)
    return tuple(res) if with_lse else res[0]


#: Prefill through the split-parallel kernels (``decode_call(..., with_lse=True)``: one program per
#: (q block, split), states to HBM, merged in a second kernel) instead of the one-kernel prefill,
#: whose two float32 ``[64, Hp]`` states per program (split and total) crowd the registers (at head
#: dim 256 the two accumulators alone take 256 registers per thread at 4 warps). Bitwise the same
#: output and ``lse`` (the decode = prefill guarantee; CPU test
#: ``test_prefill_split_parallel_gives_the_one_kernel_bits``). On the H100 (run s19-1,
#: ``benchmarks/prefill_split_parallel.py --lean``): the same bits in 11 of 11 comparisons (bf16 at
#: head dims 128/256, f16 at 256, causal / window + soft cap + ragged lengths, five issue shapes)
#: and faster at every measured shape: 1.12-1.17x at head dim 128, 1.34-1.52x at 256 (B8 T8192
#: H256 K4: 25.2 -> 17.1 ms). So the GPU prefill takes this path for these padded head dims and
#: dtypes (float32 was not timed, and its GPU bit test did not finish in s19-1) when the keys span
#: at least two splits (one split: ``decode_call``'s single kernel is the one-kernel prefill's
#: program). Not yet timed: the row groups ``PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES`` imposes on
#: larger prefills (B8 T8192 ran as one call in s19-1).
PREFILL_SPLIT_PARALLEL_HEAD_DIMS: frozenset = frozenset({128, 256})
PREFILL_SPLIT_PARALLEL_DTYPES = _DECODE_TUNED_DTYPES

#: Most bytes of split states (float32, in HBM) one ``decode_call`` of the split-parallel prefill may
#: allocate: larger prefills run it on groups of rows (``split_parallel_prefill``). The states take
#: ``splits * (Hp + 2) * 4`` bytes per packed row (``B * T * N`` rows): 4 GiB for B8 T8192 N8 H256
#: in one call, 64 GiB at T = 32k, where the one-kernel prefill needs none.
PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES = 1 << 30


def prefill_uses_split_parallel(hp: int, num_splits: int, backend: str, dtype) -> bool:
    """Whether ``prefill_call`` runs the split-parallel kernels (see
    ``PREFILL_SPLIT_PARALLEL_HEAD_DIMS``); a speed choice, never a bit change."""
    return (backend == "gpu" and num_splits >= 2 and hp in PREFILL_SPLIT_PARALLEL_HEAD_DIMS
            and jnp.dtype(dtype) in PREFILL_SPLIT_PARALLEL_DTYPES)


def split_parallel_prefill(qp, kp, vp, lo, hi, kvl, cfg: AttnConfig,
                           max_state_bytes: int | None = None):
    """``(o, lse)`` of prefill through ``decode_call(..., with_lse=True)``, on groups of packed
    rows (multiples of ``BLOCK_Q``, so every q block is the one-call q block) whose split states
    fit ``max_state_bytes`` (default ``PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES``), one group after
    another (``lax.map``; the rows are padded to whole groups with empty rows, sliced off after).
    Rows never interact, so the grouping does not change a bit; it bounds the memory."""
    limit = PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES if max_state_bytes is None else max_state_bytes
    b, kh, rp, hp = qp.shape
    ns = -(-kp.shape[1] // ATTN_SPLIT_K)
    per_row = b * kh * ns * (hp + 2) * 4
    group = max(BLOCK_Q, limit // per_row // BLOCK_Q * BLOCK_Q)
    if group >= rp:
        return decode_call(qp, kp, vp, lo, hi, kvl, cfg, with_lse=True)
    ng = -(-rp // group)
    pad = ng * group - rp   # empty rows (interval [0, 0), length 0): output 0, lse -inf
    qg = jnp.pad(qp, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kh, ng, group, hp)
    rows = [jnp.pad(a, ((0, 0), (0, pad))).reshape(b, ng, group).transpose(1, 0, 2) for a in (lo, hi, kvl)]
    o, lse = lax.map(lambda x: decode_call(x[0], kp, vp, *x[1:], cfg, with_lse=True),
                     (qg.transpose(2, 0, 1, 3, 4), *rows))
    o = o.transpose(1, 2, 0, 3, 4).reshape(b, kh, ng * group, hp)[:, :, :rp]
    return o, lse.transpose(1, 2, 0, 3).reshape(b, kh, ng * group)[:, :, :rp]


def prefill_call(qp, kp, vp, lo, hi, kvl, cfg: AttnConfig):
    """Prefill on prepared operands: ``(o [B, K, Rp, Hp], lse [B, K, Rp])`` from the one-kernel
    prefill (``attention_fwd_call``) or, where ``prefill_uses_split_parallel`` says so, from the
    split-parallel kernels (``split_parallel_prefill``); the same bits either way."""
    be = _backend.resolve(cfg.backend)
    ns = -(-kp.shape[1] // ATTN_SPLIT_K)
    if prefill_uses_split_parallel(qp.shape[-1], ns, be, qp.dtype):
        return split_parallel_prefill(qp, kp, vp, lo, hi, kvl, cfg)
    return attention_fwd_call(qp, kp, vp, lo, hi, kvl, cfg)


# ----------------------------------------------------------------------------------------------
# Backward kernels (deterministic: fixed loop orders, no atomics)


def _bwd_p_ds(q, k, v, do, kidx, lo, hi, lse, delta, cfg):
    """Recomputed probabilities ``p`` and the logit gradient ``ds`` (w.r.t. ``q . k``)."""
    raw = _dot_nt(q, k, _precision(q.dtype)) * cfg.scale
    if cfg.soft_cap is not None:
        t = jnp.tanh(raw / cfg.soft_cap)
        s = cfg.soft_cap * t
    else:
        s = raw
    valid = (kidx >= lo[:, None]) & (kidx < hi[:, None])
    lse_use = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.where(valid, jnp.exp(jnp.where(valid, s, 0.0) - lse_use[:, None]), 0.0)
    dp = _dot_nt(do, v, _precision(v.dtype))
    ds = p * (dp - delta[:, None])
    if cfg.soft_cap is not None:
        ds = ds * (1.0 - t * t)
    return p, ds * cfg.scale


def _bwd_dq_kernel(lo_ref, hi_ref, kvl_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref,
                   dq_ref, delta_ref, *, cfg):
    lo, hi = lo_ref[...], hi_ref[...]
    kv_len = jnp.max(kvl_ref[...])
    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...]
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    blk_start, blk_end = _block_range(lo, hi)

    def body(j, dq):
        k, v, kidx = _load_kv_block(k_ref, v_ref, j, kv_len)
        _, ds = _bwd_p_ds(q, k, v, do, kidx, lo, hi, lse, delta, cfg)
        return dq + _dot_nn(ds.astype(k.dtype), k, _precision(k.dtype))

    dq = lax.fori_loop(blk_start, blk_end, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    delta_ref[...] = delta


def _bwd_dkv_kernel(lo_ref, hi_ref, kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    dk_ref, dv_ref, *, cfg, num_q_blocks):
    j = pl.program_id(2)
    kstart = j * BLOCK_K
    kidx = kstart + jnp.arange(BLOCK_K, dtype=jnp.int32)
    kv_len = jnp.max(kvl_ref[pl.ds(0, BLOCK_Q)])
    ok = (kidx < kv_len)[:, None]
    k, v = k_ref[...], v_ref[...]
    k = jnp.where(ok, k, jnp.zeros_like(k))
    v = jnp.where(ok, v, jnp.zeros_like(v))

    def body(i, carry):
        rows = pl.ds(pl.multiple_of(i * BLOCK_Q, BLOCK_Q), BLOCK_Q)
        lo, hi = lo_ref[rows], hi_ref[rows]
        touch = jnp.max(((hi > lo) & (lo < kstart + BLOCK_K) & (hi > kstart)).astype(jnp.int32)) > 0

        def update(carry):
            dk, dv = carry
            q, do = q_ref[rows, :], do_ref[rows, :]
            p, ds = _bwd_p_ds(q, k, v, do, kidx, lo, hi, lse_ref[rows], delta_ref[rows], cfg)
            dv = dv + _dot_tn(p.astype(do.dtype), do, _precision(do.dtype))
            dk = dk + _dot_tn(ds.astype(q.dtype), q, _precision(q.dtype))
            return dk, dv

        return lax.cond(touch, update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def attention_bwd_call(qp, kp, vp, lo, hi, kvl, o, lse, do, cfg: AttnConfig):
    """Gradients ``(dq [B,K,Rp,Hp], dk [B,Sp,K,Hp], dv [B,Sp,K,Hp])`` of the prefill kernel."""
    be = _backend.resolve(cfg.backend)
    _check_backend(be)
    b, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    nq = rp // BLOCK_Q
    interp = _backend.interpret_arg(be)
    cp = _compiler_params(be, hp)
    dq, delta = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg),
        grid=(b, kh, nq),
        in_specs=[_row_spec(), _row_spec(), _row_spec(), _qrow_spec(hp),
                  _kv_full_spec(sp, hp), _kv_full_spec(sp, hp), _qrow_spec(hp), _qrow_spec(hp),
                  pl.BlockSpec((None, None, BLOCK_Q), lambda b, h, i: (b, h, i))],
        out_specs=[_qrow_spec(hp), pl.BlockSpec((None, None, BLOCK_Q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                   jax.ShapeDtypeStruct((b, kh, rp), jnp.float32)],
        interpret=interp, compiler_params=cp, name="detjax_attention_bwd_dq",
    )(lo, hi, kvl, qp, kp, vp, o, do, lse)
    full_rows = pl.BlockSpec((None, rp), lambda b, h, j: (b, 0))
    full_q = pl.BlockSpec((None, None, rp, hp), lambda b, h, j: (b, h, 0, 0))
    full_vec = pl.BlockSpec((None, None, rp), lambda b, h, j: (b, h, 0))
    kv_blk = pl.BlockSpec((None, BLOCK_K, None, hp), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, num_q_blocks=nq),
        grid=(b, kh, sp // BLOCK_K),
        in_specs=[full_rows, full_rows, full_rows, full_q, kv_blk, kv_blk, full_q, full_vec,
                  full_vec],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        interpret=interp, compiler_params=cp, name="detjax_attention_bwd_dkv",
    )(lo, hi, kvl, qp, kp, vp, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# References


def _resolve_defaults(q, k, scale, q_positions, kv_lengths):
    b, t, _, h = q.shape
    s = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    if q_positions is None:
        q_positions = default_q_positions(b, t, s)
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), s, jnp.int32)
    return float(scale), jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_lengths, jnp.int32)


def attention_reference(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None,
                        scale=None, q_positions=None, kv_lengths=None):
    """Plain-JAX attention with the kernels' semantics *and* order: the same rows, 64-key blocks,
    1024-key splits and the same ``_block_step``/``_merge_states``/``_finalize`` code, evaluated
    for all rows and blocks at once (fully masked blocks are exact no-ops, so not skipping them
    changes nothing). Arguments as ``detjax.ops.attention`` (no checks)."""
    scale, q_positions, kv_lengths = _resolve_defaults(q, k, scale, q_positions, kv_lengths)
    cfg = AttnConfig(scale, None if logits_soft_cap is None else float(logits_soft_cap), "interpret")
    return _reference_impl(q, k, v, q_positions, kv_lengths, cfg=cfg, causal=bool(causal),
                           sliding_window=sliding_window)


@functools.partial(jax.jit, static_argnames=("cfg", "causal", "sliding_window"))
def _reference_impl(q, k, v, q_positions, kv_lengths, *, cfg, causal, sliding_window):
    b, t, n, h = q.shape
    qp, kp, vp, lo, hi, kvl = prepare(q, k, v, q_positions, kv_lengths, causal=causal,
                                      sliding_window=sliding_window)
    _, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    nq = rp // BLOCK_Q
    qb = qp.reshape(b, kh, nq, BLOCK_Q, hp)
    lo, hi = (a.reshape(b, 1, nq, BLOCK_Q) for a in (lo, hi))
    lead = (b, kh, nq, BLOCK_Q)
    total = _empty_state(lead, hp)
    nblocks = sp // BLOCK_K
    for c in range(-(-nblocks // BLOCKS_PER_SPLIT)):
        part = _empty_state(lead, hp)
        for j in range(c * BLOCKS_PER_SPLIT, min(nblocks, (c + 1) * BLOCKS_PER_SPLIT)):
            kidx = j * BLOCK_K + jnp.arange(BLOCK_K, dtype=jnp.int32)
            ok = (kidx[None, :] < kv_lengths[:, None])[:, :, None, None]  # [B, 64, 1, 1]
            kb = jnp.where(ok, kp[:, j * BLOCK_K:(j + 1) * BLOCK_K], 0)
            vb = jnp.where(ok, vp[:, j * BLOCK_K:(j + 1) * BLOCK_K], 0)
            kb = jnp.broadcast_to(kb.transpose(0, 2, 1, 3)[:, :, None], (b, kh, nq, BLOCK_K, hp))
            vb = jnp.broadcast_to(vb.transpose(0, 2, 1, 3)[:, :, None], (b, kh, nq, BLOCK_K, hp))
            s, valid = _logits(qb, kb, kidx, lo, hi, cfg)
            part = _block_step(part, s, valid, vb)
        total = _merge_states(total, part)
    out, _ = _finalize(total)
    return unpack_rows(out.astype(q.dtype).reshape(b, kh, rp, hp), t, n, h)


def attention_f64_reference(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None,
                            scale=None, q_positions=None, kv_lengths=None):
    """Float64 numpy attention with the same mask semantics (accuracy yardstick). Returns f64."""
    scale, q_positions, kv_lengths = _resolve_defaults(q, k, scale, q_positions, kv_lengths)
    lo, hi = (np.asarray(a) for a in row_bounds(q_positions, kv_lengths, causal=causal,
                                                sliding_window=sliding_window))
    q64, k64, v64 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    b, t, n, h = q64.shape
    s, kh = k64.shape[1], k64.shape[2]
    g = n // kh
    k64 = np.repeat(k64, g, axis=2)
    v64 = np.repeat(v64, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q64, k64) * scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
    j = np.arange(s)
    valid = (j[None, None, :] >= lo[:, :, None]) & (j[None, None, :] < hi[:, :, None])  # [B,T,S]
    valid = valid[:, None]
    logits = np.where(valid, logits, -np.inf)
    mx = np.max(logits, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.where(valid, np.exp(logits - mx), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den == 0, 1.0, den)
    return np.einsum("bnts,bsnh->btnh", p, v64)
