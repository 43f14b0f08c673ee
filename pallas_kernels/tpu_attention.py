"""Batch-invariant attention lowered through Mosaic TPU (backends ``'tpu'`` and ``'tpu-interpret'``).

Prefill, chunked prefill and KV-cache decode run ONE forward kernel (``attention_fwd_call``), so
decode = prefill bitwise for the same query token by construction; the backward (``custom_vjp``)
is two more kernels (dQ, then dK/dV). ``detjax.ops.attention`` / ``decode_attention`` dispatch here
when the resolved backend is ``'tpu'`` or ``'tpu-interpret'``. Semantics (masks, positions,
``kv_lengths``, GQA/MQA, soft cap, empty rows = 0, garbage beyond the length never read into a
result, non-finite values following IEEE arithmetic only within a row's key interval: a NaN logit
makes the row NaN, a masked NaN/inf value reaches no row, also not as ``0 * NaN`` in ``p @ v``) are
those of ``pallas_kernels/attention.py``, whose row packing (``pack_rows``) and key intervals
(``row_bounds``) are reused unchanged. ``attention_reference`` is a plain-JAX version of this
file's order; on the CPU it reproduces the ``'tpu-interpret'`` bits.

Status: verified in TPU interpret mode (race detection on) and lowered to Mosaic on the CPU; not
compiled or run on a real TPU (Mosaic's layout passes run in libtpu).

Reduction order (see also ``pallas_kernels/order.py``)
------------------------------------------------------
The GPU order, with a 128-key KV block instead of 64:

* Rows: the ``T * G`` (token, query head) pairs of one (batch element, KV head) are packed as rows
  ``t * G + g`` and processed ``ATTN_BLOCK_Q`` (= 64) at a time, as on the GPU. Rows never interact.
* KV blocks lie on an absolute grid anchored at key 0: block ``j`` = keys
  ``[j * 128, (j + 1) * 128)`` (``TPU_ATTN_BLOCK_K``), visited in ascending ``j`` (the last grid
  axis, sequential). Blocks outside the q block's union of key intervals are skipped (they would be
  exact no-ops; their DMA is skipped too, the index map clamps to the visited range).
* Splits of ``ATTN_SPLIT_K`` (= 1024, as on the GPU) keys, also anchored at 0: split ``c`` = blocks
  ``8 c .. 8 c + 7``. Each split runs its own online softmax from the empty state
  ``(-inf, 0, 0)``; at the split's last block its state is merged into the running total by the
  guarded merge rule, in ascending ``c``; then ``out = acc / l`` (exactly 0 for an empty row).
* The block step and the merge/finalize formulas are the GPU's (``_block_step``,
  ``_merge_states``, ``_finalize`` of ``attention.py``), written with the row statistics ``m`` and
  ``l`` kept lane-replicated as ``[64, 128]`` tiles (every lane holds the same value) instead of
  ``[64]`` vectors. ``s = (q . k) * scale`` is one MXU dot of a fixed ``[64, Hp] x [Hp, 128]`` tile
  (f32 accumulation, ``Precision.HIGHEST`` for f32), then ``cap * tanh(s / cap)``; ``p @ v`` is one
  ``[64, 128] x [128, Hp]`` dot with ``p`` cast to ``v``'s dtype (bf16 stays bf16; f32 at
  ``HIGHEST``). A ``v`` block holding a NaN/inf takes ``_pv``'s exact guarded path (as on the GPU;
  its count codes use base 256 for the 128-key block).
* The per-row ``max``/``sum`` over a block reduce exactly the 128 lanes of one vreg row (Mosaic's
  cross-lane reduce; XLA's CPU reduce of ``[64, 128]`` in interpret mode).

Where this differs from the GPU order, and why:

* KV block 128 keys, not 64: the key axis of the ``[64, 128]`` score tile is the lane axis, and a
  128-key block fills exactly one vreg width (and matches the lane-replicated ``m``/``l``). The
  split size is unchanged, so splits hold 8 blocks instead of 16; the split boundaries (every 1024
  keys, anchored at 0) are the GPU's.
* Decode does not run split-parallel programs plus a merge kernel (flash-decoding): TPU grid steps
  run sequentially on a TensorCore, so it runs the prefill kernel itself; the splits are merged at
  the same boundaries in the same order. Decode = prefill therefore holds trivially.
* Head dims are zero-padded to a multiple of 128 (lane width) instead of a power of two >= 16;
  keys to a multiple of 128. Zero columns and masked keys contribute exact zeros. The padding is a
  copy of k/v, so on a TPU a cache whose head dim and ``max_len`` are multiples of 128 avoids one
  per decode call.
* float16 inputs are converted to float32 in the wrapper (exact; Mosaic's f16 support varies by
  chip), so f16 runs the f32 arithmetic and ``p`` is not rounded to f16 before ``p @ v``; the output
  is rounded once to f16.
* KV blocks stream through VMEM (one ``[128, Hp]`` block of k and of v per grid step, double
  buffered), so the cache length is not limited by VMEM. The per-row key intervals travel as
  lane-replicated ``[rows, 128]`` int32 tiles (like the segment ids of JAX's TPU flash attention):
  1 KiB per row of HBM, read once per q block.

So TPU attention bits differ from GPU and CPU-interpret bits (as for matmul and rows); ``'tpu'``
and ``'tpu-interpret'`` share the order but not necessarily the bits (MXU vs XLA's CPU dot).

Backward: dQ kernel, grid ``(B, K, q block, KV block)`` with KV blocks ascending, recomputing
``p = exp(s - lse)`` and accumulating ``dq += ds @ k`` in an f32 VMEM accumulator; it also writes
``delta = rowsum(o * do)``. dK/dV kernel, grid ``(B, K, KV block, q block)`` with q blocks ascending
(GQA: the ``G`` heads of a KV head are rows of the same q blocks), ``dv += p^T @ do``,
``dk += ds^T @ q``. No atomics: bitwise deterministic run to run, and batch-invariant.

Every ``BlockSpec`` is checked with ``tpu.check_tpu_block_shape`` before the kernel is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import attention as _k
from pallas_kernels import backend as _backend
from pallas_kernels import tpu as _tpu
from pallas_kernels._rows import round_up
from pallas_kernels.order import ATTN_BLOCK_Q, ATTN_SPLIT_K

#: KV block of the TPU attention kernels: one vreg width of keys.
TPU_ATTN_BLOCK_K = 128
#: Rows (token, query head pairs) per program, as on the GPU.
BLOCK_Q = ATTN_BLOCK_Q
LANES = 128

TPU_BACKENDS = _tpu.TPU_BACKENDS

assert ATTN_SPLIT_K % TPU_ATTN_BLOCK_K == 0 and TPU_ATTN_BLOCK_K == LANES


def padded_head_dim(head_dim: int) -> int:
    """Head dims are zero-padded to a multiple of 128 (the lane width)."""
    return round_up(max(int(head_dim), 1), LANES)


def _blocks_per_split() -> int:
    return ATTN_SPLIT_K // TPU_ATTN_BLOCK_K


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract_a, contract_b):
    """f32-accumulated dot over one axis of 2-D tiles (in a kernel) or of tiles with the same
    leading batch dims (the reference); inputs in ``b``'s dtype, ``Precision.HIGHEST`` for f32."""
    nb = a.ndim - 2
    bd = tuple(range(nb))
    return lax.dot_general(a.astype(b.dtype), b, (((nb + contract_a,), (nb + contract_b,)), (bd, bd)),
                           precision=_precision(b.dtype), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a [.., M, K] @ b [.., K, N]
    return _dot(a, b, 1, 0)


def _dot_nt(a, b):  # a [.., M, D] @ b [.., N, D]^T
    return _dot(a, b, 1, 1)


def _dot_tn(a, b):  # a [.., K, M]^T @ b [.., K, N]
    return _dot(a, b, 0, 0)


# ----------------------------------------------------------------------------------------------
# Operands (plain XLA; integer or exact)


def prepare(q, k, v, q_positions, kv_lengths, *, causal, sliding_window):
    """Public-layout arrays -> kernel operands.

    Returns ``(qp [B,K,Rp,Hp], kp, vp [B,Sp,K*Hp], lohi [B,2,Rp,128] (the rows' key intervals
    ``[lo, hi)``, lane-replicated), kvl [B], blk_start, blk_end [B, Rp/64])``: ``[blk_start,
    blk_end)`` of each q block (the union of its rows' intervals; ``[0, 0)`` when all are empty).
    f16 operands become f32 (exact).
    """
    if q.dtype == jnp.float16:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    hp = padded_head_dim(h)
    qp = _k.pack_rows(q, kh, hp)
    rp = qp.shape[2]
    nq = rp // BLOCK_Q  # pack_rows pads rows to a multiple of ATTN_BLOCK_Q (= BLOCK_Q)
    lo, hi = _k.row_bounds(q_positions, kv_lengths, causal=causal, sliding_window=sliding_window)
    lo, hi = (_k.pack_row_ints(a, g, rp) for a in (lo, hi))  # [B, Rp]; padding rows are [0, 0)
    ne = hi > lo
    lob = jnp.where(ne, lo, jnp.iinfo(jnp.int32).max).reshape(b, nq, BLOCK_Q).min(-1)
    hib = jnp.where(ne, hi, 0).reshape(b, nq, BLOCK_Q).max(-1)
    bk = TPU_ATTN_BLOCK_K
    nonempty = hib > 0
    blk_start = jnp.where(nonempty, lob // bk, 0).astype(jnp.int32)
    blk_end = jnp.where(nonempty, (hib + bk - 1) // bk, 0).astype(jnp.int32)
    sp = max(bk, round_up(s, bk))

    def kv(x):
        if (sp, hp) != (s, h):
            x = jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))
        return x.reshape(b, sp, kh * hp)  # free: the heads are contiguous per key

    lohi = jnp.broadcast_to(jnp.stack([lo, hi], axis=1)[..., None], (b, 2, rp, LANES))
    return (qp, kv(k), kv(v), lohi.astype(jnp.int32), kv_lengths.astype(jnp.int32), blk_start,
            blk_end)


# ----------------------------------------------------------------------------------------------
# Per-row arithmetic on lane-replicated statistics: m, l are [rows, 128], acc is [rows, Hp].
# Formulas as _block_step / _merge_states / _finalize in attention.py.


def _wide(x, hp):
    """``[rows, 128]`` lane-replicated -> ``[rows, Hp]`` (the value every lane holds)."""
    return jnp.tile(x, (1, hp // LANES))


def _empty(lead, hp):
    """The empty state ``(-inf, 0, 0)`` for rows of shape ``lead``."""
    return (jnp.full(lead + (LANES,), -jnp.inf, jnp.float32), jnp.zeros(lead + (LANES,), jnp.float32),
            jnp.zeros(lead + (hp,), jnp.float32))


# Non-finite values of a block are counted with one exact dot: each value gets a code (NaN 1, +inf
# 256, -inf 65536, finite 0; powers of two, exact in bf16), ``valid @ code`` sums them per row in f32
# (at most 128 keys per block, so each count is < 256 and the sum < 2**24: exact), and the counts
# are read back by exact divisions. (The GPU uses base 128 for its 64-key blocks.)
_NAN_CODE, _PINF_CODE, _NINF_CODE = 1.0, 256.0, 65536.0


def _pv(p, v, valid):
    """``p @ v`` in which keys outside a row's interval never contribute, not even as ``0 * NaN``.

    An all-finite ``v`` block (the normal case) takes the plain dot. Otherwise the dot runs on ``v``
    with its non-finite entries zeroed, and each (row, column) whose *valid* keys hold a non-finite
    value gets the IEEE sum of those: NaN for a NaN or for both infinities, else the infinity. Same
    rule as ``_add_pv`` in ``attention.py``.
    """
    dot = _dot_nn
    finite = jnp.abs(v) < jnp.inf  # False for NaN and +-inf

    def plain():
        return dot(p, v)

    def guarded():
        pv = dot(p, jnp.where(finite, v, jnp.zeros_like(v)))
        codes = (_NAN_CODE, _PINF_CODE, _NINF_CODE)
        cnt = dot(valid, _k.nonfinite_code(v, codes))
        return _k.apply_nonfinite_counts(pv, cnt, codes)

    return lax.cond(jnp.min(finite.astype(jnp.int32)) > 0, plain, guarded)


def _nan_max(a, b):
    """``maximum`` that propagates NaN on every backend (XLA's CPU max reduce, which interpret mode
    runs, drops NaN)."""
    return jnp.where((a != a) | (b != b), jnp.nan, jnp.maximum(a, b))


def _block_step(state, s, valid, v):
    """Fold one KV block into a row state; a row with no valid key keeps its state bitwise. A NaN
    logit at a valid key makes the row NaN (detected explicitly, as on the GPU)."""
    m, l, acc = state
    hp = acc.shape[-1]
    # s is -inf outside the row's interval; [rows, 1] statistics of the block:
    row_nan = jnp.max(jnp.where(s != s, 1, 0), axis=-1, keepdims=True) > 0
    m_blk = jnp.where(row_nan, jnp.nan, jnp.max(jnp.where(s != s, -jnp.inf, s), axis=-1, keepdims=True))
    any_valid = jnp.broadcast_to((m_blk > -jnp.inf) | row_nan, m.shape)
    m_new = _nan_max(m, m_blk)
    m_use = jnp.where(any_valid, m_new, 0.0)            # finite wherever it is used (or NaN: NaN row)
    p = jnp.where(valid, jnp.exp(s - m_use), 0.0)       # s is [rows, 128] = the lane tile of m
    alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_use))
    l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc_new = acc * _wide(alpha, hp) + _pv(p, v, valid)
    return (jnp.where(any_valid, m_new, m), jnp.where(any_valid, l_new, l),
            jnp.where(_wide(any_valid, hp), acc_new, acc))


def _merge(total, part):
    return _k._merge_states(total, part, widen=_wide)


def _finalize(state):
    m, l, acc = state
    hp = acc.shape[-1]
    empty = m == -jnp.inf
    l_safe = jnp.where(empty, 1.0, l)
    out = jnp.where(_wide(empty, hp), 0.0, acc / _wide(l_safe, hp))
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
    return out, lse


def _kv_block(k_ref, v_ref, j, kv_len):
    """The ``[128, Hp]`` k/v block ``j``; keys ``>= kv_len`` replaced by zeros. (They are never
    valid for a row, and ``_pv`` keeps invalid non-finite values out anyway; zeroing them keeps
    garbage in an unused cache tail from sending its block down ``_pv``'s slow path.)"""
    shape = k_ref.shape
    kidx = j * TPU_ATTN_BLOCK_K + lax.broadcasted_iota(jnp.int32, shape, 0)
    ok = kidx < kv_len
    k, v = k_ref[...], v_ref[...]
    return jnp.where(ok, k, jnp.zeros_like(k)), jnp.where(ok, v, jnp.zeros_like(v))


def _valid(lohi_ref, j):
    """``[rows, 128]``: key ``j * 128 + lane`` lies in the row's interval."""
    lohi = lohi_ref[...]
    lo, hi = lohi[0], lohi[1]
    kidx = j * TPU_ATTN_BLOCK_K + lax.broadcasted_iota(jnp.int32, lo.shape, 1)
    return (kidx >= lo) & (kidx < hi)


def _scores(q, k, cfg):
    """``(q . k^T) * scale`` as one ``[rows, Hp] x [128, Hp]^T`` dot; returns ``(raw, capped, t)``."""
    s = _dot_nt(q, k) * cfg.scale
    if cfg.soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.soft_cap)
    return cfg.soft_cap * t, t


# ----------------------------------------------------------------------------------------------
# Block specs (every one checked against Mosaic's tiling rule)


def _spec(block, index_map, array_shape, dtype, name):
    _tpu.check_tpu_block_shape(block, array_shape, dtype, kernel=name)
    return pl.BlockSpec(block, index_map)


def _clamp(j, start, end):
    """A KV block index inside the visited range ``[start, end)`` (so skipped steps re-use the
    block already in VMEM instead of fetching a new one)."""
    return jnp.minimum(jnp.maximum(j, start), jnp.maximum(end - 1, start))


# ----------------------------------------------------------------------------------------------
# Forward (prefill, chunked prefill and decode)


def _fwd_kernel(kvl_ref, bs_ref, be_ref, lohi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                ml_ref, acc_ref, *, cfg, nkv):
    # Scratch: ml_ref [4, rows, 128] = (m, l) of the split, then (m, l) of the total;
    # acc_ref [2, rows, Hp] = acc of the split, then of the total.
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    start, end = bs_ref[b, i], be_ref[b, i]
    rows, hp = acc_ref.shape[1:]
    per = _blocks_per_split()
    empty = _empty((rows,), hp)

    @pl.when(j == 0)
    def _():
        ml_ref[...] = jnp.stack([empty[0], empty[1]] * 2)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((j >= start) & (j < end))
    def _():
        k, v = _kv_block(k_ref, v_ref, j, kvl_ref[b])
        s, _ = _scores(q_ref[...], k, cfg)
        valid = _valid(lohi_ref, j)
        s = jnp.where(valid, s, -jnp.inf)
        ml = ml_ref[0:2]
        m, l, acc = _block_step((ml[0], ml[1], acc_ref[0]), s, valid, v)
        ml_ref[0:2] = jnp.stack([m, l])
        acc_ref[0] = acc

    c = lax.div(j, per)  # j >= 0 (lax.div: no sign handling of jnp's floor division)
    split_end = (lax.rem(j, per) == per - 1) | (j == nkv - 1)
    touched = (c * per < end) & ((c + 1) * per > start)

    @pl.when(split_end & touched)
    def _():
        ml, acc = ml_ref[...], acc_ref[...]
        m, l, a = _merge((ml[2], ml[3], acc[1]), (ml[0], ml[1], acc[0]))
        ml_ref[...] = jnp.stack([empty[0], empty[1], m, l])
        acc_ref[...] = jnp.stack([empty[2], a])

    @pl.when(j == nkv - 1)
    def _():
        ml = ml_ref[2:4]
        out, lse = _finalize((ml[0], ml[1], acc_ref[1]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def attention_fwd_call(qp, kp, vp, lohi, kvl, blk_start, blk_end, cfg):
    """Forward kernel on ``prepare``d operands: ``(o [B,K,Rp,Hp], lse [B,K,Rp,128])``."""
    be = _tpu._resolve(cfg.backend)
    b, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    bq, bk = BLOCK_Q, TPU_ATTN_BLOCK_K
    nq, nkv = rp // bq, sp // bk
    name = "detjax_tpu_attention_fwd"
    dt = qp.dtype

    def kv_map(b, h, i, j, kvl, bs, be_):
        return b, _clamp(j, bs[b, i], be_[b, i]), h

    rows2 = lambda b, h, i, j, *_: (b, 0, i, 0)
    qrow = lambda b, h, i, j, *_: (b, h, i, 0)
    in_specs = [
        _spec((None, 2, bq, LANES), rows2, lohi.shape, lohi.dtype, name),
        _spec((None, None, bq, hp), qrow, qp.shape, dt, name),
        _spec((None, bk, hp), kv_map, kp.shape, kp.dtype, name),
        _spec((None, bk, hp), kv_map, vp.shape, vp.dtype, name),
    ]
    out_specs = [
        _spec((None, None, bq, hp), qrow, qp.shape, dt, name),
        _spec((None, None, bq, LANES), qrow, (b, kh, rp, LANES), jnp.float32, name),
    ]
    f32 = jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kh, nq, nkv),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((4, bq, LANES), f32), pltpu.VMEM((2, bq, hp), f32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nkv=nkv),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qp.shape, dt), jax.ShapeDtypeStruct((b, kh, rp, LANES), f32)],
        compiler_params=_tpu._compiler_params(be, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_backend.interpret_arg(be),
        name=name,
    )(kvl, blk_start, blk_end, lohi, qp, kp, vp)


# ----------------------------------------------------------------------------------------------
# Backward


def _p_ds(q, k, v, do, lse, delta, valid, cfg):
    """Recomputed probabilities and the gradient w.r.t. ``q . k`` (``[rows, 128]`` each)."""
    s, t = _scores(q, k, cfg)
    lse_use = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.where(valid, jnp.exp(jnp.where(valid, s, 0.0) - lse_use), 0.0)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds * cfg.scale


def _bwd_dq_kernel(kvl_ref, bs_ref, be_ref, lohi_ref, q_ref, k_ref, v_ref, o_ref, do_ref,
                   lse_ref, dq_ref, delta_ref, dq_acc, delta_acc, *, cfg, nkv):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_acc[...] = jnp.zeros_like(dq_acc)
        od = o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32)
        delta_acc[...] = jnp.broadcast_to(jnp.sum(od, axis=-1, keepdims=True), delta_acc.shape)

    @pl.when((j >= bs_ref[b, i]) & (j < be_ref[b, i]))
    def _():
        k, v = _kv_block(k_ref, v_ref, j, kvl_ref[b])
        _, ds = _p_ds(q_ref[...], k, v, do_ref[...], lse_ref[...], delta_acc[...],
                      _valid(lohi_ref, j), cfg)
        dq_acc[...] += _dot_nn(ds, k)

    @pl.when(j == nkv - 1)
    def _():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
        delta_ref[...] = delta_acc[...]


def _bwd_dkv_kernel(kvl_ref, bs_ref, be_ref, lohi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                    delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, cfg, nq):
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when((j >= bs_ref[b, i]) & (j < be_ref[b, i]))
    def _():
        k, v = _kv_block(k_ref, v_ref, j, kvl_ref[b])
        q, do = q_ref[...], do_ref[...]
        p, ds = _p_ds(q, k, v, do, lse_ref[...], delta_ref[...], _valid(lohi_ref, j), cfg)
        dv_acc[...] += _dot_tn(p, do)
        dk_acc[...] += _dot_tn(ds, q)

    @pl.when(i == nq - 1)
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def attention_bwd_call(qp, kp, vp, lohi, kvl, blk_start, blk_end, o, lse, do, cfg):
    """Gradients ``(dq [B,K,Rp,Hp], dk, dv [B,Sp,K*Hp])`` of ``attention_fwd_call``'s ``o``."""
    be = _tpu._resolve(cfg.backend)
    b, kh, rp, hp = qp.shape
    sp = kp.shape[1]
    bq, bk = BLOCK_Q, TPU_ATTN_BLOCK_K
    nq, nkv = rp // bq, sp // bk
    dt = qp.dtype
    f32 = jnp.float32
    lane_shape = (b, kh, rp, LANES)
    interp = _backend.interpret_arg(be)
    sem = ("parallel", "parallel", "parallel", "arbitrary")

    name = "detjax_tpu_attention_bwd_dq"

    def kv_map(b, h, i, j, kvl, bs, be_):
        return b, _clamp(j, bs[b, i], be_[b, i]), h

    rows2 = lambda b, h, i, j, *_: (b, 0, i, 0)
    qrow = lambda b, h, i, j, *_: (b, h, i, 0)
    dq, delta = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg, nkv=nkv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kh, nq, nkv),
            in_specs=[
                _spec((None, 2, bq, LANES), rows2, lohi.shape, lohi.dtype, name),
                _spec((None, None, bq, hp), qrow, qp.shape, dt, name),
                _spec((None, bk, hp), kv_map, kp.shape, kp.dtype, name),
                _spec((None, bk, hp), kv_map, vp.shape, vp.dtype, name),
                _spec((None, None, bq, hp), qrow, o.shape, o.dtype, name),
                _spec((None, None, bq, hp), qrow, do.shape, do.dtype, name),
                _spec((None, None, bq, LANES), qrow, lse.shape, f32, name),
            ],
            out_specs=[_spec((None, None, bq, hp), qrow, qp.shape, dt, name),
                       _spec((None, None, bq, LANES), qrow, lane_shape, f32, name)],
            scratch_shapes=[pltpu.VMEM((bq, hp), f32), pltpu.VMEM((bq, LANES), f32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qp.shape, dt), jax.ShapeDtypeStruct(lane_shape, f32)],
        compiler_params=_tpu._compiler_params(be, sem),
        interpret=interp,
        name=name,
    )(kvl, blk_start, blk_end, lohi, qp, kp, vp, o, do, lse)

    name = "detjax_tpu_attention_bwd_dkv"
    rows2t = lambda b, h, j, i, *_: (b, 0, i, 0)
    qrowt = lambda b, h, j, i, *_: (b, h, i, 0)
    kvt = lambda b, h, j, i, *_: (b, j, h)
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kh, nkv, nq),
            in_specs=[
                _spec((None, 2, bq, LANES), rows2t, lohi.shape, lohi.dtype, name),
                _spec((None, None, bq, hp), qrowt, qp.shape, dt, name),
                _spec((None, bk, hp), kvt, kp.shape, kp.dtype, name),
                _spec((None, bk, hp), kvt, vp.shape, vp.dtype, name),
                _spec((None, None, bq, hp), qrowt, do.shape, do.dtype, name),
                _spec((None, None, bq, LANES), qrowt, lse.shape, f32, name),
                _spec((None, None, bq, LANES), qrowt, lane_shape, f32, name),
            ],
            out_specs=[_spec((None, bk, hp), kvt, kp.shape, kp.dtype, name),
                       _spec((None, bk, hp), kvt, vp.shape, vp.dtype, name)],
            scratch_shapes=[pltpu.VMEM((bk, hp), f32), pltpu.VMEM((bk, hp), f32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=_tpu._compiler_params(be, sem),
        interpret=interp,
        name=name,
    )(kvl, blk_start, blk_end, lohi, qp, kp, vp, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Differentiable core and the public-layout entry point


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(qp, kp, vp, lohi, kvl, bs, be, cfg):
    return attention_fwd_call(qp, kp, vp, lohi, kvl, bs, be, cfg)[0]


def _core_fwd(qp, kp, vp, lohi, kvl, bs, be, cfg):
    o, lse = attention_fwd_call(qp, kp, vp, lohi, kvl, bs, be, cfg)
    return o, (qp, kp, vp, lohi, kvl, bs, be, o, lse)


def _core_bwd(cfg, res, do):
    qp, kp, vp, lohi, kvl, bs, be, o, lse = res
    dq, dk, dv = attention_bwd_call(qp, kp, vp, lohi, kvl, bs, be, o, lse, do, cfg)
    return dq, dk, dv, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def attention(q, k, v, q_positions, kv_lengths, *, cfg, causal, sliding_window):
    """TPU attention on public-layout arrays (checked and defaulted by ``detjax.ops``):
    ``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``q_positions [B,T]``, ``kv_lengths [B]`` int32.
    Returns ``[B,T,N,H]`` in ``q``'s dtype. Decode calls this too (queries at
    ``lengths - Tq + i`` against the cache), which is why decode = prefill bitwise."""
    b, t, n, h = q.shape
    ops = prepare(q, k, v, q_positions, kv_lengths, causal=causal, sliding_window=sliding_window)
    o = _core(*ops, cfg)
    return _k.unpack_rows(o, t, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Reference


def attention_reference(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None,
                        scale=None, q_positions=None, kv_lengths=None):
    """Plain-JAX attention in the TPU kernels' order: the same operands (``prepare``), 128-key
    blocks, 1024-key splits and the same ``_block_step`` / ``_merge`` / ``_finalize`` code, for all
    rows and blocks at once (fully masked blocks are exact no-ops, so not skipping them changes
    nothing). On the CPU it reproduces the ``'tpu-interpret'`` bits: a check that the kernel runs
    the documented order. Arguments as ``detjax.ops.attention`` (no checks)."""
    scale, q_positions, kv_lengths = _k._resolve_defaults(q, k, scale, q_positions, kv_lengths)
    cfg = _k.AttnConfig(scale, None if logits_soft_cap is None else float(logits_soft_cap),
                        "tpu-interpret")
    return _reference_impl(q, k, v, q_positions, kv_lengths, cfg=cfg, causal=bool(causal),
                           sliding_window=sliding_window)


@functools.partial(jax.jit, static_argnames=("cfg", "causal", "sliding_window"))
def _reference_impl(q, k, v, q_positions, kv_lengths, *, cfg, causal, sliding_window):
    b, t, n, h = q.shape
    qp, kp, vp, lohi, kvl, _, _ = prepare(q, k, v, q_positions, kv_lengths, causal=causal,
                                          sliding_window=sliding_window)
    _, kh, rp, hp = qp.shape
    sp, bk = kp.shape[1], TPU_ATTN_BLOCK_K
    nq = rp // BLOCK_Q
    lead = (b, kh, nq, BLOCK_Q)
    qb = qp.reshape(lead + (hp,))
    lo, hi = (jnp.broadcast_to(lohi[:, i].reshape(b, 1, nq, BLOCK_Q, LANES), lead + (LANES,))
              for i in (0, 1))
    kp, vp = (x.reshape(b, sp, kh, hp) for x in (kp, vp))
    nblocks, per = sp // bk, _blocks_per_split()
    total = _empty(lead, hp)
    for c in range(-(-nblocks // per)):
        part = _empty(lead, hp)
        for j in range(c * per, min(nblocks, (c + 1) * per)):
            kidx = j * bk + jnp.arange(bk, dtype=jnp.int32)
            ok = (kidx[None, :] < kvl[:, None])[:, :, None, None]            # [B, 128, 1, 1]
            kb, vb = (jnp.where(ok, x[:, j * bk:(j + 1) * bk], 0).transpose(0, 2, 1, 3)[:, :, None]
                      for x in (kp, vp))                                    # [B, K, 1, 128, Hp]
            kb, vb = (jnp.broadcast_to(x, lead[:3] + (bk, hp)) for x in (kb, vb))
            s, _ = _scores(qb, kb, cfg)
            valid = (kidx >= lo) & (kidx < hi)
            part = _block_step(part, jnp.where(valid, s, -jnp.inf), valid, vb)
        # The kernel keeps its states in VMEM scratch, so XLA (interpret mode) never fuses the
        # merge with its neighbours; the barriers do the same here (fused, an exp was seen to
        # round differently).
        total = lax.optimization_barrier(_merge(*lax.optimization_barrier((total, part))))
    out, _ = _finalize(total)
    return _k.unpack_rows(out.astype(qp.dtype).reshape(b, kh, rp, hp), t, n, h).astype(q.dtype)
