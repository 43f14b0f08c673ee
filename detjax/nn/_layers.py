"""Flax NNX layers computing through ``detjax.ops`` (or plain XLA ops, see ``_impl``).

Every layer takes explicit ``rngs: nnx.Rngs``, ``dtype`` (activation / compute dtype: inputs and
parameters are cast to it before use; ``None`` = promote input and params) and ``param_dtype``
(storage dtype of its parameters), and ``impl`` (``'detjax'`` | ``'xla'`` | ``None``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detjax.nn._impl import check_impl, current_impl, ops
from detjax.ops._gather import embedding_lookup

__all__ = ["Linear", "Einsum", "Embed", "RMSNorm", "Attention", "FeedForward", "Block",
           "apply_rope", "set_implementation"]


def _dt(x, dtype):
    return x if dtype is None else x.astype(dtype)


def _compute_dtype(x, w, dtype):
    return jnp.dtype(dtype) if dtype is not None else jnp.promote_types(x.dtype, w.dtype)


def set_implementation(module: nnx.Module, impl) -> nnx.Module:
    """Set ``impl`` ('detjax' | 'xla' | None) on ``module`` and every sub-layer, in place."""
    impl = check_impl(impl)
    it = nnx.iter_modules(module) if hasattr(nnx, "iter_modules") else module.iter_modules()
    for _, m in it:
        if hasattr(m, "impl"):
            m.impl = impl
    return module


class Linear(nnx.Module):
    """``y = x @ W (+ b)`` with ``W: [in_features, out_features]``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype=None, param_dtype=jnp.float32, impl=None, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def __call__(self, x):
        w = self.kernel[...]
        dt = _compute_dtype(x, w, self.dtype)
        y = ops(self.impl).matmul(x.astype(dt), w.astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


class Einsum(nnx.Module):
    """``einsum(equation, x, W)`` with a weight of ``shape`` (Gemma's projections)."""

    def __init__(self, equation: str, shape, *, dtype=None, param_dtype=jnp.float32, impl=None,
                 init=None, rngs: nnx.Rngs):
        init = init or nnx.initializers.normal(stddev=1.0 / math.sqrt(max(1, shape[-2] if len(shape) > 1 else shape[0])))
        self.w = nnx.Param(init(rngs.params(), tuple(shape), param_dtype))
        self.equation = equation
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def __call__(self, x):
        w = self.w[...]
        dt = _compute_dtype(x, w, self.dtype)
        return ops(self.impl).einsum(self.equation, x.astype(dt), w.astype(dt))


class Embed(nnx.Module):
    """Token embedding ``E: [vocab, features]``; ``attend(x) = x @ E^T`` (tied unembedding).

    ``attend`` contracts ``x``'s last axis with ``E``'s feature axis through ``dot_general``, so
    ``E`` is read in its stored ``[vocab, features]`` layout without a transpose copy.
    """

    def __init__(self, num_embeddings: int, features: int, *, dtype=None,
                 param_dtype=jnp.float32, impl=None, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(features))
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.num_embeddings, self.features = num_embeddings, features
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def __call__(self, tokens):
        e = self.embedding[...]
        if current_impl(self.impl) == "xla":
            y = jnp.take(e, tokens, axis=0)           # XLA's gradient: scatter-add (atomics on GPU)
        else:
            y = embedding_lookup(e, tokens)           # same rows; run-to-run deterministic gradient
        return _dt(y, self.dtype)

    def attend(self, x):
        e = self.embedding[...]
        dt = _compute_dtype(x, e, self.dtype)
        return ops(self.impl).dot_general(x.astype(dt), e.astype(dt),
                                          (((x.ndim - 1,), (1,)), ((), ())))


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``; ``scale`` is stored as a delta
    from 1 (initialised to 0), normalised in float32, output in the activation dtype."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
                 impl=None, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps = float(eps)
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def __call__(self, x, residual=None):
        """``norm(x)``; with ``residual``: ``residual + norm(x)`` (one kernel on detjax when the
        residual has the normalised output's dtype)."""
        x = _dt(x, self.dtype)
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            return residual + ops(self.impl).rms_norm(x, self.scale[...], eps=self.eps, offset=1.0)
        return ops(self.impl).rms_norm(x, self.scale[...], eps=self.eps, offset=1.0,
                                       residual=residual)


def _one_launch(impl, x, layers, get_weights):
    """The projections of ``x`` by ``layers`` (``get_weights()``: their weights as ``[G, D, H]``) as
    one ``head_projections`` call: on detjax when the layers share a compute dtype (one kernel
    launch on the GPU, each output bitwise its own layer's), else ``None`` (call the layers one by
    one)."""
    o = ops(impl)
    if o.name != "detjax":
        return None
    weights = get_weights()
    dts = {_compute_dtype(x, w, m.dtype) for m, w in zip(layers, weights)}
    if len(dts) != 1:
        return None
    dt = dts.pop()
    return o.head_projections(x.astype(dt), [w.astype(dt) for w in weights])


def apply_rope(x, positions, *, base: float = 10_000.0, scale_factor: float = 1.0, impl=None,
               multiplier: float | None = None):
    """Rotary embedding (split-half convention, as Gemma) of ``x: [B, T, N, H]`` at integer
    ``positions: [B, T]``; computed in float32 elementwise, returned in ``x``'s dtype, then
    multiplied by ``multiplier`` (in ``x``'s dtype; Gemma's query pre-scaling) if given.

    The rotation, the casts and the multiplier are one isolated fusion (forward and backward),
    reading ``cos``/``sin`` as ``[B, T, 1, H/2]`` constants: ``a * c - b * s`` is a multiply-add
    that XLA:GPU may or may not contract into an FMA depending on what else shares the fusion, so
    what shares it is fixed here."""
    h = x.shape[-1]
    half = h // 2
    # Inverse frequencies are computed on the host (float64 -> float32 constants) so the angle is
    # one IEEE multiply: a traced ``pos / timescale`` was measured to round differently inside a
    # decode while_loop than in a standalone program (XLA rewrote/folded it differently).
    inv_freq = np.asarray(1.0 / (scale_factor * base ** (2.0 * np.arange(half) / h)), np.float32)
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,half]
    angle = angle[:, :, None, :]
    sin, cos = ops(impl).isolated(lambda a: (jnp.sin(a), jnp.cos(a)), angle)
    dt = x.dtype

    def rotate(v, c, s):
        v1, v2 = jnp.split(v.astype(jnp.float32), 2, axis=-1)
        y = jnp.concatenate([v1 * c - v2 * s, v2 * c + v1 * s], axis=-1).astype(dt)
        return y if multiplier is None else y * jnp.asarray(multiplier, dt)
    return ops(impl).isolated(rotate, x, consts=(cos, sin))


#: The attention kernels ``Attention`` can run under the ``'detjax'`` implementation.
ATTENTION_KERNELS = ("triton", "mosaic")


class Attention(nnx.Module):
    """Gemma attention (MHA / GQA / MQA): q/k/v projections, optional QK-norm, RoPE, query
    pre-scaling by ``query_pre_attn_scalar ** -0.5``, optional logit soft-cap and sliding window,
    output projection.

    ``attention_kernel``: ``'triton'`` (``detjax.ops.attention`` / ``decode_attention``) or
    ``'mosaic'`` (``detjax.experimental.mosaic_attention`` / ``mosaic_decode_attention``: Hopper
    GPUs, bf16/f16). It applies to the ``'detjax'`` implementation; ``'xla'`` runs XLA's attention.

    Projections: ``q: 'BTD,NDH->BTNH'``, ``k``/``v``: ``'BSD,KDH->BSKH'``, out: ``'BTNH,NHD->BTD'``.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 query_pre_attn_scalar: float | None = None, logits_soft_cap: float | None = None,
                 sliding_window: int | None = None, use_qk_norm: bool = False,
                 rope_base: float = 10_000.0, rope_scale_factor: float = 1.0, norm_eps: float = 1e-6,
                 attention_kernel: str = "triton", dtype=None, param_dtype=jnp.float32, impl=None,
                 rngs: nnx.Rngs):
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}; got "
                             f"{attention_kernel!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.q_proj = Einsum("BTD,NDH->BTNH", (num_heads, d_model, head_dim), **kw)
        self.k_proj = Einsum("BSD,KDH->BSKH", (num_kv_heads, d_model, head_dim), **kw)
        self.v_proj = Einsum("BSD,KDH->BSKH", (num_kv_heads, d_model, head_dim), **kw)
        self.o_proj = Einsum("BTNH,NHD->BTD", (num_heads, head_dim, d_model),
                             init=nnx.initializers.normal(1.0 / math.sqrt(num_heads * head_dim)), **kw)
        if use_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, **kw)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.query_pre_attn_scalar = float(query_pre_attn_scalar or head_dim)
        self.logits_soft_cap = logits_soft_cap
        self.sliding_window = sliding_window
        self.rope_base, self.rope_scale_factor = float(rope_base), float(rope_scale_factor)
        self.attention_kernel = attention_kernel
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def _attention_ops(self):
        """``(attention, decode_attention)`` of this layer's implementation and kernel."""
        if self.attention_kernel == "mosaic" and current_impl(self.impl) == "detjax":
            from detjax import experimental
            return experimental.mosaic_attention, experimental.mosaic_decode_attention
        o = ops(self.impl)
        return o.attention, o.decode_attention

    def _project(self, x):
        """``(q_proj(x), k_proj(x), v_proj(x))``, as one launch where possible (``_one_launch``)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if all(p.equation in ("BTD,NDH->BTNH", "BSD,KDH->BSKH") for p in projs):
            out = _one_launch(self.impl, x, projs, lambda: [p.w[...] for p in projs])
            if out is not None:
                return tuple(out)
        return tuple(p(x) for p in projs)

    def _qkv(self, x, positions):
        q, k, v = self._project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return (*self.rope_qk(q, k, positions), v)

    def rope_qk(self, q, k, positions):
        """RoPE of queries and keys; queries also pre-scaled by ``query_pre_attn_scalar ** -0.5``
        (in the same fusion)."""
        rope = dict(base=self.rope_base, scale_factor=self.rope_scale_factor, impl=self.impl)
        return (apply_rope(q, positions, multiplier=self.query_pre_attn_scalar ** -0.5, **rope),
                apply_rope(k, positions, **rope))

    def _opts(self):
        return dict(causal=True, sliding_window=self.sliding_window,
                    logits_soft_cap=self.logits_soft_cap, scale=1.0)

    def __call__(self, x, positions=None, kv_lengths=None):
        """Self-attention over ``x: [B, T, D]`` (key ``j`` at position ``j``; ``positions``
        default ``arange(T)``); ``kv_lengths: [B]`` marks right padding. Returns ``(y, (k, v))``."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        q, k, v = self._qkv(x, positions)
        o = self._attention_ops()[0](q, k, v, q_positions=positions, kv_lengths=kv_lengths,
                                     **self._opts())
        return self.o_proj(o), (k, v)

    def decode(self, x, k_cache, v_cache, lengths):
        """``x: [B, Tq, D]``: the tokens at positions ``lengths[b] .. lengths[b] + Tq - 1``. Writes
        their keys/values into the caches ``[B, max_len, K, H]`` and attends. Returns
        ``(y, k_cache, v_cache)``; the new valid length is ``lengths + Tq``."""
        o, k_cache, v_cache = self.decode_heads(x, k_cache, v_cache, lengths)
        return self.o_proj(o), k_cache, v_cache

    def decode_heads(self, x, k_cache, v_cache, lengths):
        """``decode`` before the output projection: ``(o [B, Tq, N, H], k_cache, v_cache)`` (the
        tensor-parallel model applies its own row-parallel output projection to ``o``)."""
        t = x.shape[1]
        positions = lengths[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
        q, k, v = self._qkv(x, positions)
        upd = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=0))
        k_cache = upd(k_cache, k.astype(k_cache.dtype), lengths)
        v_cache = upd(v_cache, v.astype(v_cache.dtype), lengths)
        o = self._attention_ops()[1](q, k_cache, v_cache, lengths + t, **self._opts())
        return o, k_cache, v_cache


def geglu(g, u, *, impl=None):
    """``gelu_tanh(g) * u`` in one isolated fusion (forward and backward)."""
    return ops(impl).isolated(lambda a, b: jax.nn.gelu(a, approximate=True) * b, g, u)


class FeedForward(nnx.Module):
    """GeGLU: ``W_down(gelu_tanh(x W_gate) * (x W_up))``."""

    def __init__(self, d_model: int, hidden_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 impl=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.gate = Linear(d_model, hidden_dim, **kw)
        self.up = Linear(d_model, hidden_dim, **kw)
        self.down = Linear(hidden_dim, d_model, **kw)
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def _gate_up(self, x):
        """``(gate(x), up(x))``, as one launch where possible (``_one_launch``)."""
        lin = (self.gate, self.up)
        if all(m.bias is None for m in lin):
            out = _one_launch(self.impl, x, lin, lambda: [m.kernel[...][None] for m in lin])
            if out is not None:
                return tuple(y[..., 0, :] for y in out)
        return tuple(m(x) for m in lin)

    def __call__(self, x):
        return self.down(geglu(*self._gate_up(x), impl=self.impl))


def _add_normed(norm, h, residual):
    """``residual + norm(h)`` (one kernel, ``RMSNorm``'s ``residual``), or ``residual + h`` without
    a norm."""
    return residual + h if norm is None else norm(h, residual=residual)


class Block(nnx.Module):
    """Gemma decoder block: ``x + post_attn_norm(attn(pre_attn_norm(x)))`` then
    ``x + post_ffw_norm(ffw(pre_ffw_norm(x)))``; post-norms (Gemma 2/3) optional."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 hidden_dim: int, *, use_post_norms: bool = True, norm_eps: float = 1e-6,
                 dtype=None, param_dtype=jnp.float32, impl=None, rngs: nnx.Rngs, **attn_kw):
        kw = dict(dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.pre_attention_norm = RMSNorm(d_model, eps=norm_eps, **kw)
        self.attn = Attention(d_model, num_heads, num_kv_heads, head_dim, norm_eps=norm_eps,
                              **attn_kw, **kw)
        self.post_attention_norm = RMSNorm(d_model, eps=norm_eps, **kw) if use_post_norms else None
        self.pre_ffw_norm = RMSNorm(d_model, eps=norm_eps, **kw)
        self.mlp = FeedForward(d_model, hidden_dim, **kw)
        self.post_ffw_norm = RMSNorm(d_model, eps=norm_eps, **kw) if use_post_norms else None
        self.dtype, self.param_dtype, self.impl = dtype, param_dtype, check_impl(impl)

    def _finish(self, x, a, mlp=None):
        """The block after attention: ``x + post_attn_norm(a)``, then the feed-forward residual.
        ``mlp``: the feed-forward function (default ``self.mlp``; the tensor-parallel model passes
        its sharded one, so both run this very code)."""
        x = _add_normed(self.post_attention_norm, a, x)
        h = (self.mlp if mlp is None else mlp)(self.pre_ffw_norm(x))
        return _add_normed(self.post_ffw_norm, h, x)

    def __call__(self, x, positions=None, kv_lengths=None):
        """Returns ``(y, (k, v))`` (the keys/values, for filling a cache)."""
        a, kv = self.attn(self.pre_attention_norm(x), positions, kv_lengths)
        return self._finish(x, a), kv

    def decode(self, x, k_cache, v_cache, lengths):
        a, k_cache, v_cache = self.attn.decode(self.pre_attention_norm(x), k_cache, v_cache, lengths)
        return self._finish(x, a), k_cache, v_cache
