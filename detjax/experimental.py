"""Experimental, opt-in detjax paths: not used by default anywhere (``deterministic`` never uses
them; the models and ``generate`` only with ``GemmaConfig(attention_kernel='mosaic')``).

``mosaic_attention`` / ``mosaic_decode_attention``: batch-invariant attention on a Hopper GPU through
a Mosaic GPU kernel (``pallas_kernels/attention_mgpu.py``, where its reduction order is
documented), several times faster prefill than ``detjax.ops.attention``'s Triton kernel (results in
``results/README.md``, sessions 10 and 11). Its bits differ from ``detjax.ops.attention``'s
(another order); between the two functions of this module, prefill, chunked prefill and decode of
the same query row give the same bits (decode runs the same kernel), whatever the batch, the other
rows, the row layout or ``max_len``.

Same arguments and mask semantics as ``detjax.ops.attention`` / ``decode_attention``, with these
limits, each a clear error: bfloat16/float16 only, head_dim <= 256, a GPU that runs Mosaic GPU
kernels (compute capability >= 9.0). Values outside a row's interval inside a visited KV block
must be finite (a zero-initialised cache is): see the kernel file. Differentiable: the gradients
come from the Triton path's deterministic backward kernels fed this kernel's log-sum-exp
(``triton_backward``), so they are run-to-run deterministic and batch-invariant.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _forward(q, k, v, q_positions, kv_lengths, causal, sliding_window, soft_cap, scale, layout):
    return _jit_forward(q, k, v, q_positions, kv_lengths, causal=causal,
                        sliding_window=sliding_window, soft_cap=soft_cap, scale=scale, layout=layout)[0]


def _forward_fwd(q, k, v, q_positions, kv_lengths, causal, sliding_window, soft_cap, scale, layout):
    o, lse = _jit_forward(q, k, v, q_positions, kv_lengths, causal=causal,
                          sliding_window=sliding_window, soft_cap=soft_cap, scale=scale, layout=layout)
    return o, (q, k, v, q_positions, kv_lengths, o, lse)


def _forward_bwd(causal, sliding_window, soft_cap, scale, layout, res, g):
    q, k, v, q_positions, kv_lengths, o, lse = res
    dq, dk, dv = triton_backward(q, k, v, q_positions, kv_lengths, o, lse, g, causal=causal,
                                 sliding_window=sliding_window, soft_cap=soft_cap, scale=scale)
    return dq, dk, dv, None, None


_forward.defvjp(_forward_fwd, _forward_bwd)

_jit_forward = jax.jit(_m.forward, static_argnames=("causal", "sliding_window", "soft_cap", "scale",
                                                    "layout"))


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "soft_cap", "scale", "backend"))
def triton_backward(q, k, v, q_positions, kv_lengths, o, lse, do, *, causal, sliding_window,
                    soft_cap, scale, backend="gpu"):
    """Gradients ``(dq, dk, dv)`` (public layout) of attention with output ``o [B, T, N, H]`` and
    natural log-sum-exp ``lse [B, T, N]``, by the Triton path's deterministic backward kernels
    (``attention_bwd_call``: recomputed probabilities ``exp(s - lse)``, fixed loop orders, no
    atomics). The Mosaic forward's ``lse`` comes from base-2 exponentials, so the recomputed
    probabilities agree with the forward's to float32 rounding, not bitwise; the gradients are
    deterministic run to run and batch-invariant (every kernel works row by row / KV block by KV
    block in a fixed order)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qp, kp, vp, lo, hi, kvl = _k.prepare(q, k, v, q_positions, kv_lengths, causal=causal,
                                         sliding_window=sliding_window)
    hp, rp = qp.shape[-1], qp.shape[2]
    op, dop = (_k.pack_rows(a, kh, hp) for a in (o, do.astype(o.dtype)))
    lsep = _k.pack_row_scalars(lse, kh, rp)
    cfg = _k.AttnConfig(scale, soft_cap, backend)
    dq, dk, dv = _k.attention_bwd_call(qp, kp, vp, lo, hi, kvl, op, lsep, dop, cfg)
    return _k.unpack_rows(dq, t, n, h), dk[:, :s, :, :h], dv[:, :s, :, :h]


def mosaic_attention(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None, scale=None,
                     q_positions=None, kv_lengths=None, layout=None):
    """Batch-invariant attention through the Mosaic GPU kernel (see the module doc).

    Arguments as ``detjax.ops.attention`` (no ``backend``: this runs on a Hopper GPU only), plus
    ``layout`` (``'tokens'``, ``'packed'`` or None: how rows are grouped into CTAs; a speed knob that
    does not change the bits). Returns ``[B, T, N, H]`` in ``q``'s dtype; rows with no valid key
    are exactly 0. Differentiable: the backward pass is the Triton path's deterministic one
    (``triton_backward``).
    """
    q, k, v = _check(q, k, v, ("q", "k", "v"))
    b, t, n, h = q.shape
    s = k.shape[1]
    causal, sliding_window, logits_soft_cap, scale = _ops._check_options(
        causal, sliding_window, logits_soft_cap, scale, h)
    q_positions, kv_lengths = _ops._positions_and_lengths(q_positions, kv_lengths, b, t, s)
    if layout not in (None,) + _m.LAYOUTS:
        raise ValueError(f"layout must be one of {_m.LAYOUTS} or None; got {layout!r}")
    _require_gpu()
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    return _forward(q, k, v, q_positions, kv_lengths, causal, sliding_window, logits_soft_cap, scale,
                    layout)


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
                    sliding_window, logits_soft_cap, scale, "packed")
