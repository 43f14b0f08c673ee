"""Public attention ops: batch-invariant prefill / chunked prefill (differentiable) and KV-cache decode.

Both run the kernels of ``pallas_kernels/attention.py`` with one reduction order (documented there),
so for the same query row, position and valid keys, ``attention`` and ``decode_attention`` return
the same bits, whatever the batch, the other rows, the cache's ``max_len`` or the chunking. On the
``'tpu'`` / ``'tpu-interpret'`` backends both run ``pallas_kernels/tpu_attention.py`` instead (its
own documented order, 128-key blocks; decode runs the prefill kernel), with the same guarantees.

Semantics (layout ``[batch, seq, heads, head_dim]``, like ``jax.nn.dot_product_attention``):

* ``logits = (q . k) * scale`` (``scale`` defaults to ``1/sqrt(head_dim)``), then with
  ``logits_soft_cap=c``: ``c * tanh(logits / c)``; softmax and accumulation in float32; the output
  has ``q``'s dtype.
* Key ``j`` has absolute position ``j``. Query ``t`` of batch element ``b`` has position
  ``q_positions[b, t]`` (default ``arange(T) + (S - T)``, i.e. the queries are the last ``T``
  positions; ``arange(T)`` when ``T == S``).
* ``causal``: key visible iff ``k_pos <= q_pos``. ``sliding_window=w`` (Gemma 2/3 convention):
  additionally ``q_pos - w < k_pos``, i.e. the ``w`` most recent positions including the query
  itself (``w=1``: only itself). Without ``causal`` the window is symmetric: ``|q_pos - k_pos| < w``.
* ``kv_lengths[b]``: keys at positions ``>= kv_lengths[b]`` are invalid (their content is never
  read into a result, NaN there is harmless).
* A query row with no valid key returns exactly 0 (no NaN).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from detjax.ops import _checks
from pallas_kernels import attention as _k
from pallas_kernels import backend as _backend

__all__ = ["attention", "decode_attention"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_qkv(q, k, v, names=("q", "k", "v")):
    q, k, v = (_checks.check_array(x, n) for x, n in zip((q, k, v), names))
    for x, n in zip((q, k, v), names):
        _checks.check_rank(x, n, (4,))
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise TypeError(f"{n} must have dtype bfloat16, float16 or float32; got {x.dtype} "
                            f"with shape {tuple(x.shape)}")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn} and {vn} must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape [B, S, K, H]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    b, t, n, h = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{qn} and {kn} must have the same batch size; got {qn} shape {tuple(q.shape)}"
                         f" and {kn} shape {tuple(k.shape)}")
    if k.shape[3] != h:
        raise ValueError(f"head_dim mismatch: {qn} has head_dim {h} ({tuple(q.shape)}) but {kn} has "
                         f"{k.shape[3]} ({tuple(k.shape)})")
    kh = k.shape[2]
    if kh == 0 or n % kh != 0:
        raise ValueError(f"the number of query heads of {qn} ({n}, shape {tuple(q.shape)}) must be a "
                         f"positive multiple of the number of KV heads of {kn} ({kh}, shape "
                         f"{tuple(k.shape)})")
    if h == 0:
        raise ValueError(f"{qn} has head_dim 0 (shape {tuple(q.shape)})")
    return q, k, v


def _check_options(causal, sliding_window, logits_soft_cap, scale, head_dim):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
            raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
        if sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive; got {sliding_window}")
        sliding_window = int(sliding_window)
    if logits_soft_cap is not None:
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, numbers.Real):
            raise ValueError(f"logits_soft_cap must be a positive number or None; got {logits_soft_cap!r}")
        if not (math.isfinite(logits_soft_cap) and logits_soft_cap > 0):
            raise ValueError(f"logits_soft_cap must be positive and finite; got {logits_soft_cap}")
        logits_soft_cap = float(logits_soft_cap)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ValueError(f"scale must be a Python/numpy number or None; got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite; got {scale}")
        scale = float(scale)
    return bool(causal), sliding_window, logits_soft_cap, scale


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _check_int_array(x, name, shape):
    x = _checks.check_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array; got dtype {x.dtype} with shape {tuple(x.shape)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}")
    return x


def _check_lengths(x, name, batch, max_len):
    x = _check_int_array(x, name, (batch,))
    if _is_concrete(x):
        xv = np.asarray(x)
        if xv.size and (xv.min() < 0 or xv.max() > max_len):
            raise ValueError(f"{name} must lie in [0, {max_len}] (the key/cache length); got "
                             f"min {int(xv.min())}, max {int(xv.max())}")
    return x.astype(jnp.int32)


def _positions_and_lengths(q_positions, kv_lengths, b, t, s):
    """Checked ``q_positions [B, T]`` and ``kv_lengths [B]`` int32, or their defaults
    (``arange(T) + S - T`` and ``S``)."""
    if q_positions is None:
        q_positions = _k.default_q_positions(b, t, s)
    else:
        q_positions = _check_int_array(q_positions, "q_positions", (b, t)).astype(jnp.int32)
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), s, jnp.int32)
    else:
        kv_lengths = _check_lengths(kv_lengths, "kv_lengths", b, s)
    return q_positions, kv_lengths


def _decode_positions(lengths, t):
    """Positions of the ``t`` newest tokens of each sequence: ``lengths[b] - t + i``."""
    return lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]


# ----------------------------------------------------------------------------------------------
# Differentiable core (custom_vjp on the packed operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(qp, kp, vp, lo, hi, kvl, cfg):
    return _k.prefill_call(qp, kp, vp, lo, hi, kvl, cfg)[0]


def _core_fwd(qp, kp, vp, lo, hi, kvl, cfg):
    o, lse = _k.prefill_call(qp, kp, vp, lo, hi, kvl, cfg)
    return o, (qp, kp, vp, lo, hi, kvl, o, lse)


def _core_bwd(cfg, res, do):
    qp, kp, vp, lo, hi, kvl, o, lse = res
    dq, dk, dv = _k.attention_bwd_call(qp, kp, vp, lo, hi, kvl, o, lse, do, cfg)
    return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("cfg", "causal", "sliding_window", "decode"))
def _run(q, k, v, q_positions, kv_lengths, *, cfg, causal, sliding_window, decode):
    if cfg.backend in ("tpu", "tpu-interpret"):  # Mosaic TPU kernels; decode runs the prefill kernel
        from pallas_kernels import tpu_attention
        return tpu_attention.attention(q, k, v, q_positions, kv_lengths, cfg=cfg, causal=causal,
                                       sliding_window=sliding_window)
    b, t, n, h = q.shape
    row_block = 1 if decode and _k.DECODE_UNPADDED_ROWS else _k.BLOCK_Q
    qp, kp, vp, lo, hi, kvl = _k.prepare(q, k, v, q_positions, kv_lengths, causal=causal,
                                         sliding_window=sliding_window, row_block=row_block)
    if decode:
        o = _k.decode_call(qp, kp, vp, lo, hi, kvl, cfg, rows=t * (n // k.shape[2]))
    else:
        o = _core(qp, kp, vp, lo, hi, kvl, cfg)
    return _k.unpack_rows(o, t, n, h)


# ----------------------------------------------------------------------------------------------
# Public API


def attention(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None, scale=None,
              q_positions=None, kv_lengths=None, backend=None):
    """Batch-invariant multi-head attention (MHA / GQA / MQA), differentiable.

    Args:
      q: ``[B, T, N, H]`` queries (bf16, f16 or f32).
      k, v: ``[B, S, K, H]`` keys and values, same dtype; ``N`` a multiple of ``K``.
      causal: mask keys after the query's position (default True).
      sliding_window: ``w > 0``: keep only keys with ``q_pos - w < k_pos`` (Gemma convention).
      logits_soft_cap: ``c > 0``: logits become ``c * tanh(logits / c)``.
      scale: logit scale (default ``1/sqrt(H)``).
      q_positions: ``[B, T]`` ints, absolute query positions (default ``arange(T) + S - T``);
        chunked prefill passes the chunk's positions with ``k``/``v`` holding every key so far.
      kv_lengths: ``[B]`` ints in ``[0, S]``; keys ``>= kv_lengths[b]`` are invalid (default S).
      backend: detjax backend override (``pallas_kernels.backend``).

    Returns:
      ``[B, T, N, H]`` in ``q``'s dtype; rows with no valid key are exactly 0.

    Gradients (``jax.custom_vjp``) w.r.t. ``q``, ``k``, ``v`` come from two Pallas kernels that
    recompute the probabilities from the saved log-sum-exp: dQ walks KV blocks, dK/dV walk q blocks,
    each in ascending order with no atomics, so the backward is bitwise deterministic run to run.
    """
    q, k, v = _check_qkv(q, k, v)
    b, t, n, h = q.shape
    s = k.shape[1]
    causal, sliding_window, logits_soft_cap, scale = _check_options(
        causal, sliding_window, logits_soft_cap, scale, h)
    be = _backend.resolve(backend)
    q_positions, kv_lengths = _positions_and_lengths(q_positions, kv_lengths, b, t, s)
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    cfg = _k.AttnConfig(scale, logits_soft_cap, be)
    return _run(q, k, v, q_positions, kv_lengths, cfg=cfg, causal=causal,
                sliding_window=sliding_window, decode=False)


def decode_attention(q, k_cache, v_cache, lengths, *, causal=True, sliding_window=None,
                     logits_soft_cap=None, scale=None, backend=None):
    """Attention of a few new tokens against a ragged KV cache (flash-decoding), bitwise equal to
    ``attention`` for the same rows.

    Args:
      q: ``[B, Tq, N, H]``: the ``Tq`` newest tokens, whose keys/values are already written in the
        cache at positions ``lengths[b] - Tq .. lengths[b] - 1``; query ``i`` has absolute position
        ``lengths[b] - Tq + i`` (negative positions see no key and return 0).
      k_cache, v_cache: ``[B, max_len, K, H]``; entries at ``>= lengths[b]`` are ignored.
      lengths: ``[B]`` ints in ``[0, max_len]``: valid cache entries per sequence.
      causal, sliding_window, logits_soft_cap, scale, backend: as ``attention``.

    Returns:
      ``[B, Tq, N, H]`` in ``q``'s dtype. Forward only (not differentiable).

    The cache is split in ``ATTN_SPLIT_K``-key splits computed by parallel programs and merged in
    ascending order by a second Pallas kernel; a ``max_len`` that is a multiple of 64 avoids a
    padding copy of the cache.
    """
    q, k_cache, v_cache = _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    b, t, n, h = q.shape
    max_len = k_cache.shape[1]
    causal, sliding_window, logits_soft_cap, scale = _check_options(
        causal, sliding_window, logits_soft_cap, scale, h)
    be = _backend.resolve(backend)
    lengths = _check_lengths(lengths, "lengths", b, max_len)
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    q_positions = _decode_positions(lengths, t)
    cfg = _k.AttnConfig(scale, logits_soft_cap, be)
    return _run(q, k_cache, v_cache, q_positions, lengths, cfg=cfg, causal=causal,
                sliding_window=sliding_window, decode=True)
