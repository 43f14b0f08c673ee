"""Experimental, opt-in detjax paths: not wired into the models, ``generate`` or ``deterministic``.

``mosaic_attention`` / ``mosaic_decode_attention``: batch-invariant attention on a Hopper GPU through
a Mosaic GPU kernel (``pallas_kernels/attention_mgpu.py``, where its reduction order is
documented), 2-4x faster prefill than ``detjax.ops.attention``'s Triton kernel (H100, run s10-6:
0.59-0.80x of cuDNN against 0.18-0.32x). Its bits differ from ``detjax.ops.attention``'s (another
order); between the two functions of this module, prefill, chunked prefill and decode of the same
query row give the same bits (decode runs the same kernel), whatever the batch, the other rows
or ``max_len``.

Same arguments and mask semantics as ``detjax.ops.attention`` / ``decode_attention``, with these
limits, each a clear error: bfloat16/float16 only, head_dim <= 256, forward only (differentiating
raises), a GPU that runs Mosaic GPU kernels (compute capability >= 9.0). Keys outside a row's
interval inside a visited 64-key block must be finite (a zero-initialised cache is): see the
kernel file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from detjax.ops import _attention as _ops
from pallas_kernels import attention as _k
from pallas_kernels import attention_mgpu as _m

__all__ = ["mosaic_attention", "mosaic_decode_attention", "mosaic_available"]


def mosaic_available() -> tuple[bool, str]:
    """``(True, '')`` when the default device can run the Mosaic GPU kernel, else ``(False, why)``."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False, f"the default device is {dev.platform!r} ({dev.device_kind}), not a GPU"
    cc = getattr(dev, "compute_capability", None)
    try:
        ok = cc is not None and float(cc) >= 9.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return False, f"{dev.device_kind} has compute capability {cc}; Mosaic GPU needs >= 9.0 (Hopper)"
    return True, ""


def _check(q, k, v, names):
    q, k, v = _ops._check_qkv(q, k, v, names)
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise TypeError(f"{names[0]} must be bfloat16 or float16 for the Mosaic GPU kernel; got "
                        f"{q.dtype} (use detjax.ops.attention for float32)")
    if q.shape[3] > _m.MAX_HEAD_DIM:
        raise ValueError(f"head_dim of {names[0]} must be at most {_m.MAX_HEAD_DIM} for the Mosaic GPU "
                         f"kernel; got {q.shape[3]} (shape {tuple(q.shape)})")
    return q, k, v


def _require_gpu():
    ok, why = mosaic_available()
    if not ok:
        raise NotImplementedError(f"mosaic attention needs a Hopper GPU: {why}. "
                                  "detjax.ops.attention runs everywhere.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _forward(q, k, v, q_positions, kv_lengths, causal, sliding_window, soft_cap, scale):
    return _packed_forward(q, k, v, q_positions, kv_lengths, causal=causal,
                           sliding_window=sliding_window, soft_cap=soft_cap, scale=scale)


def _forward_fwd(q, k, v, q_positions, kv_lengths, causal, sliding_window, soft_cap, scale):
    return _forward(q, k, v, q_positions, kv_lengths, causal, sliding_window, soft_cap, scale), None


def _forward_bwd(causal, sliding_window, soft_cap, scale, res, g):
    raise NotImplementedError("detjax.experimental.mosaic_attention is forward-only; "
                              "differentiate detjax.ops.attention instead")


_forward.defvjp(_forward_fwd, _forward_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "soft_cap", "scale"))
def _packed_forward(q, k, v, q_positions, kv_lengths, *, causal, sliding_window, soft_cap, scale):
    """Pack rows with the Triton path's own ``prepare`` (same rows, intervals and padding), pad the
    rows to the kernel's 128-row CTAs, run the kernel, unpack. Traceable on any platform (the
    tests lower it for CUDA on a CPU machine)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qp, kp, vp, lo, hi, _ = _k.prepare(q, k, v, q_positions, kv_lengths, causal=causal,
                                       sliding_window=sliding_window)
    hp = qp.shape[-1]
    hm = -(-hp // 64) * 64      # wgmma tiles: head dim a multiple of 64 (zero columns are exact)
    rp = qp.shape[2]
    rpp = -(-rp // _m.CTA_ROWS) * _m.CTA_ROWS
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rpp - rp), (0, hm - hp)))
    kp, vp = (jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, hm - hp))) if hm != hp else a for a in (kp, vp))
    lo, hi = (jnp.broadcast_to(jnp.pad(a, ((0, 0), (0, rpp - rp)))[:, None], (b, kh, rpp))
              for a in (lo, hi))
    o = _m.mosaic_attention_call(qp, kp, vp, lo, hi, scale=scale, soft_cap=soft_cap)
    return _k.unpack_rows(o[:, :, :rp, :hp], t, n, h)


def mosaic_attention(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None, scale=None,
                     q_positions=None, kv_lengths=None):
    """Batch-invariant attention through the Mosaic GPU kernel (forward only; see the module doc).

    Arguments as ``detjax.ops.attention`` (no ``backend``: this runs on a Hopper GPU only).
    Returns ``[B, T, N, H]`` in ``q``'s dtype; rows with no valid key are exactly 0.
    """
    q, k, v = _check(q, k, v, ("q", "k", "v"))
    b, t, n, h = q.shape
    s = k.shape[1]
    causal, sliding_window, logits_soft_cap, scale = _ops._check_options(
        causal, sliding_window, logits_soft_cap, scale, h)
    q_positions, kv_lengths = _ops._positions_and_lengths(q_positions, kv_lengths, b, t, s)
    _require_gpu()
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    return _forward(q, k, v, q_positions, kv_lengths, causal, sliding_window, logits_soft_cap, scale)


def mosaic_decode_attention(q, k_cache, v_cache, lengths, *, causal=True, sliding_window=None,
                            logits_soft_cap=None, scale=None):
    """The newest ``Tq`` tokens against a KV cache through the same kernel as ``mosaic_attention``
    (so the same bits as its prefill rows). Arguments as ``detjax.ops.decode_attention``."""
    q, k_cache, v_cache = _check(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    b, t, n, h = q.shape
    max_len = k_cache.shape[1]
    causal, sliding_window, logits_soft_cap, scale = _ops._check_options(
        causal, sliding_window, logits_soft_cap, scale, h)
    lengths = _ops._check_lengths(lengths, "lengths", b, max_len)
    _require_gpu()
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    q_positions = _ops._decode_positions(lengths, t)
    return _forward(q, k_cache, v_cache, q_positions, lengths.astype(jnp.int32), causal,
                    sliding_window, logits_soft_cap, scale)
