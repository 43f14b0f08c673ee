"""Which arithmetic the detjax.nn layers run on: ``'detjax'`` (fixed-order Pallas kernels) or
``'xla'`` (plain jnp / jax.nn / einsum+softmax attention, for comparisons and negative controls).

Both namespaces have identical signatures, so a layer calls ``ops(self.impl).matmul(...)`` and runs
the very same module code and parameters either way.

Resolution of a layer's implementation: the layer's constructor argument ``impl`` (if not None),
otherwise the innermost active ``implementation(...)`` context, otherwise ``'detjax'``.
The setting is read when the layer is *called* (traced), so a context around a ``jax.jit``-ed call
applies at its first trace only: the context is not part of jit's cache key, so a function
already traced under one implementation keeps it (use a fresh ``jax.jit``/``nnx.jit`` wrapper, or
the constructor argument / ``set_implementation``, which are part of the module's static graph).
"""

from __future__ import annotations

import contextlib
import math
import threading
import types

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("detjax", "xla")
_local = threading.local()


def check_impl(impl, name="impl"):
    if impl is None:
        return None
    if not isinstance(impl, str) or impl.strip().lower() not in IMPLS:
        raise ValueError(f"{name} must be one of {IMPLS} or None; got {impl!r}")
    return impl.strip().lower()


@contextlib.contextmanager
def implementation(impl: str):
    """Run detjax.nn layers built with ``impl=None`` on ``impl`` ('detjax' or 'xla') inside the block."""
    impl = check_impl(impl)
    if impl is None:
        raise ValueError("implementation() needs 'detjax' or 'xla'")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(impl)
    try:
        yield impl
    finally:
        stack.pop()


def current_impl(impl=None) -> str:
    """The implementation a layer with constructor argument ``impl`` uses now."""
    impl = check_impl(impl)
    if impl is not None:
        return impl
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else "detjax"


def ops(impl=None):
    """The op namespace (``DETJAX`` or ``XLA``) for ``impl`` resolved as in ``current_impl``."""
    return DETJAX if current_impl(impl) == "detjax" else XLA


# ---------------------------------------------------------------------------------------------
# The detjax namespace


def _detjax_namespace():
    import detjax.ops as dops
    from detjax.ops import _attention, _linalg

    return types.SimpleNamespace(
        name="detjax", matmul=dops.matmul, einsum=dops.einsum, dot_general=dops.dot_general,
        sum=dops.sum, mean=dops.mean, max=dops.max, logsumexp=dops.logsumexp,
        softmax=dops.softmax, log_softmax=dops.log_softmax, argmax=dops.argmax,
        rms_norm=dops.rms_norm, attention=_attention.attention,
        decode_attention=_attention.decode_attention, cumsum=dops.cumsum, isolated=dops.isolated,
        head_projections=_linalg.head_projections)


# ---------------------------------------------------------------------------------------------
# The XLA namespace (plain ops, same signatures / semantics)

_HI = lax.Precision.HIGHEST


def _x_matmul(a, b, **kw):
    return jnp.matmul(a, b, precision=_HI)


def _x_einsum(subscripts, *operands, **kw):
    return jnp.einsum(subscripts, *operands, precision=_HI)


def _x_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    dt = jnp.promote_types(lhs.dtype, rhs.dtype)
    return lax.dot_general(lhs.astype(dt), rhs.astype(dt), dimension_numbers, precision=_HI,
                           preferred_element_type=preferred_element_type)


def _x_rms_norm(x, scale, *, eps=1e-6, offset=1.0, residual=None, **kw):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * lax.rsqrt(var + eps) * (offset + scale.astype(jnp.float32))).astype(x.dtype)
    return y if residual is None else residual + y


def _x_sum(x, axis=-1, keepdims=False, **kw):
    return jnp.sum(x.astype(jnp.float32), axis=axis, keepdims=keepdims).astype(x.dtype)


def _x_mean(x, axis=-1, keepdims=False, **kw):
    return jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=keepdims).astype(x.dtype)


def _x_attention_core(q, k, v, q_positions, kv_lengths, causal, sliding_window, logits_soft_cap,
                      scale):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=_HI,
                        preferred_element_type=jnp.float32) * scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    kpos = jnp.arange(s, dtype=jnp.int32)[None, None, :]              # [1,1,S]
    qpos = q_positions.astype(jnp.int32)[:, :, None]                 # [B,T,1]
    mask = kpos < kv_lengths.astype(jnp.int32)[:, None, None]
    if causal:
        mask &= kpos <= qpos
        if sliding_window is not None:
            mask &= qpos - sliding_window < kpos
    elif sliding_window is not None:
        mask &= jnp.abs(qpos - kpos) < sliding_window
    mask = mask[:, None, None, :, :]                                  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32), precision=_HI)
    return o.reshape(b, t, n, h).astype(q.dtype)


def _x_attention(q, k, v, *, causal=True, sliding_window=None, logits_soft_cap=None, scale=None,
                 q_positions=None, kv_lengths=None, backend=None):
    b, t = q.shape[:2]
    s = k.shape[1]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_lengths is None:
        kv_lengths = jnp.full((b,), s, jnp.int32)
    return _x_attention_core(q, k, v, q_positions, kv_lengths, causal, sliding_window,
                             logits_soft_cap, scale)


def _x_decode_attention(q, k_cache, v_cache, lengths, *, causal=True, sliding_window=None,
                        logits_soft_cap=None, scale=None, backend=None):
    t = q.shape[1]
    lengths = jnp.asarray(lengths, jnp.int32)
    q_positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    return _x_attention_core(q, k_cache, v_cache, q_positions, lengths, causal, sliding_window,
                             logits_soft_cap, scale)


XLA = types.SimpleNamespace(
    name="xla", matmul=_x_matmul, einsum=_x_einsum, dot_general=_x_dot_general,
    sum=_x_sum, mean=_x_mean,
    max=lambda x, axis=-1, keepdims=False, **kw: jnp.max(x, axis=axis, keepdims=keepdims),
    logsumexp=lambda x, axis=-1, keepdims=False, **kw: jax.nn.logsumexp(x, axis=axis, keepdims=keepdims),
    softmax=lambda x, axis=-1, **kw: jax.nn.softmax(x, axis=axis),
    log_softmax=lambda x, axis=-1, **kw: jax.nn.log_softmax(x, axis=axis),
    argmax=lambda x, axis=-1, keepdims=False, **kw: jnp.argmax(x, axis=axis, keepdims=keepdims),
    rms_norm=_x_rms_norm, attention=_x_attention, decode_attention=_x_decode_attention,
    cumsum=lambda x, axis=-1: jnp.cumsum(x, axis=axis),
    isolated=lambda fn, *args, consts=(): fn(*args, *consts),
    head_projections=lambda x, ws, **kw: [jnp.einsum("...d,gdh->...gh", x, w, precision=_HI)
                                          for w in ws])


class _LazyDetjax:
    _ns = None

    def __getattr__(self, item):
        if _LazyDetjax._ns is None:
            _LazyDetjax._ns = _detjax_namespace()
        return getattr(_LazyDetjax._ns, item)


DETJAX = _LazyDetjax()
