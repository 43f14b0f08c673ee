"""A Gemma-style decoder (Gemma 1 / 2 / 3 architectures) on detjax.nn layers, with a KV cache."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from detjax.nn import Block, Embed, RMSNorm
from detjax.nn._layers import ATTENTION_KERNELS
from detjax.nn._impl import check_impl, ops

__all__ = ["GemmaConfig", "Transformer"]


def scale_embedding(x, d_model: int, impl=None):
    """``x * sqrt(d_model)`` in ``x``'s dtype, isolated (forward and backward) so that XLA never
    contracts the multiply with a neighbouring add (the residual) into an FMA in one program and
    not in another."""
    s = jnp.asarray(math.sqrt(d_model), x.dtype)
    return ops(impl).isolated(lambda v: v * s, x)


def final_logits(logits, cap: float | None, impl=None):
    """The unembedding's output as float32, soft-capped to ``cap * tanh(logits / cap)`` if ``cap``;
    the cast and the cap are one isolated fusion (the logits are read once, in their dtype).
    Multiplies by a host-computed reciprocal: a division by a constant may be rewritten differently
    by XLA in different programs (prefill vs the decode loop)."""
    if cap is None:
        return logits.astype(jnp.float32)
    return ops(impl).isolated(
        lambda v: jnp.tanh(v.astype(jnp.float32) * jnp.float32(1.0 / cap)) * jnp.float32(cap),
        logits)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma-style decoder.

    Fields:
      vocab_size: number of tokens (rows of the tied embedding).
      d_model: width of the residual stream (embedding size).
      num_layers: number of decoder blocks.
      num_heads: query heads per layer.
      num_kv_heads: key/value heads per layer (``num_heads`` = MHA, 1 = MQA, otherwise GQA);
        must divide ``num_heads``.
      head_dim: size of each attention head.
      hidden_dim: hidden size of the GeGLU feed-forward (each of the gate and up projections).
      attention_pattern: per-layer attention kinds, ``'local'`` (sliding window) or ``'global'``,
        repeated cyclically over the layers (Gemma 2: local, global; Gemma 3: 5 local, 1 global).
      sliding_window: window ``w`` of the local layers (key visible iff ``q_pos - w < k_pos``);
        ``None`` makes every layer global.
      attn_logits_soft_cap: ``c``: attention logits become ``c * tanh(logits / c)`` (Gemma 2: 50).
      final_logits_soft_cap: same cap applied to the output logits (Gemma 2: 30).
      query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5`` before the
        dot product (the attention itself uses scale 1); ``None`` = ``head_dim``.
      use_qk_norm: RMSNorm over ``head_dim`` of queries and keys before RoPE (Gemma 3).
      use_post_norms: RMSNorm on the attention and feed-forward outputs before the residual add
        (Gemma 2/3; Gemma 1 has only the pre-norms).
      rope_base_global: RoPE wavelength base of global layers (Gemma 3: 1e6).
      rope_base_local: RoPE wavelength base of local layers (10k).
      rope_scale_factor: positions are divided by it before RoPE (context extension; 1 = none).
      norm_eps: epsilon of every RMSNorm.
      dtype: activation dtype name (``'bfloat16'``, ``'float32'``...): activations and the inputs of
        every op are cast to it.
      param_dtype: parameter storage dtype name.
      upcast_activations_to_float32: run activations and reductions in float32 whatever ``dtype``
        says; parameters keep ``param_dtype`` (cast to float32 exactly at use).
      embed_scale_by_sqrt_dim: multiply the embedding output by ``sqrt(d_model)`` (rounded to the
        activation dtype, as Gemma does).
      attention_kernel: which batch-invariant attention kernels the ``'detjax'`` implementation runs:
        ``'triton'`` (default: ``detjax.ops.attention`` / ``decode_attention``, every backend) or
        ``'mosaic'`` (``detjax.experimental.mosaic_attention``: Hopper GPUs, bf16/f16 activations,
        head_dim <= 256; faster prefill, other bits, no key splits in decode). Prefill, decode and
        generation agree bitwise with either; the two kernels' bits differ from each other.
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    hidden_dim: int = 128
    attention_pattern: tuple = ("local", "global")
    sliding_window: int | None = 8
    attn_logits_soft_cap: float | None = 50.0
    final_logits_soft_cap: float | None = 30.0
    query_pre_attn_scalar: float | None = None
    use_qk_norm: bool = True
    use_post_norms: bool = True
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    rope_scale_factor: float = 1.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    upcast_activations_to_float32: bool = False
    embed_scale_by_sqrt_dim: bool = True
    attention_kernel: str = "triton"

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "hidden_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GemmaConfig.{f} must be a positive int; got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim must be even (RoPE); got {self.head_dim}")
        object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
        if not self.attention_pattern or any(p not in ("local", "global")
                                             for p in self.attention_pattern):
            raise ValueError("GemmaConfig.attention_pattern must be a non-empty sequence of "
                             f"'local'/'global'; got {self.attention_pattern!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError(f"GemmaConfig.sliding_window must be a positive int or None; got "
                             f"{self.sliding_window!r}")
        for f in ("dtype", "param_dtype"):
            v = getattr(self, f)
            try:
                name = jnp.dtype(v).name
            except TypeError:
                raise ValueError(f"GemmaConfig.{f}: {v!r} is not a dtype") from None
            if name not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"GemmaConfig.{f} must be float32, bfloat16 or float16; got {name}")
            object.__setattr__(self, f, name)
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"GemmaConfig.attention_kernel must be one of {ATTENTION_KERNELS}; got "
                             f"{self.attention_kernel!r}")
        if self.attention_kernel == "mosaic":
            if self.upcast_activations_to_float32 or self.dtype == "float32":
                raise ValueError("GemmaConfig.attention_kernel='mosaic' needs bfloat16/float16 "
                                 f"activations; got dtype={self.dtype!r}, upcast_activations_to_float32="
                                 f"{self.upcast_activations_to_float32} (use attention_kernel='triton')")
            if self.head_dim > 256:
                raise ValueError("GemmaConfig.attention_kernel='mosaic' needs head_dim <= 256; got "
                                 f"{self.head_dim}")

    # --- presets ------------------------------------------------------------------------------
    @classmethod
    def gemma1_2b(cls, **kw):
        """Gemma 1 2B (approximate): MQA, no soft-caps, no post-norms, all global."""
        base = dict(vocab_size=256_128, d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                    head_dim=256, hidden_dim=16_384, attention_pattern=("global",),
                    sliding_window=None, attn_logits_soft_cap=None, final_logits_soft_cap=None,
                    query_pre_attn_scalar=256, use_qk_norm=False, use_post_norms=False,
                    dtype="bfloat16", param_dtype="bfloat16")
        return cls(**{**base, **kw})

    @classmethod
    def gemma2_2b(cls, **kw):
        """Gemma 2 2B (approximate): GQA 8/4, local(4096)/global alternation, soft-caps 50/30."""
        base = dict(vocab_size=256_128, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                    head_dim=256, hidden_dim=9216, attention_pattern=("local", "global"),
                    sliding_window=4096, attn_logits_soft_cap=50.0, final_logits_soft_cap=30.0,
                    query_pre_attn_scalar=256, use_qk_norm=False, use_post_norms=True,
                    dtype="bfloat16", param_dtype="bfloat16")
        return cls(**{**base, **kw})

    @classmethod
    def gemma3_1b(cls, **kw):
        """Gemma 3 1B (approximate): MQA, QK-norm, 5 local(512) : 1 global, RoPE 10k/1M."""
        base = dict(vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                    head_dim=256, hidden_dim=6912, attention_pattern=("local",) * 5 + ("global",),
                    sliding_window=512, attn_logits_soft_cap=None, final_logits_soft_cap=None,
                    query_pre_attn_scalar=256, use_qk_norm=True, use_post_norms=True,
                    rope_base_global=1_000_000.0, rope_base_local=10_000.0,
                    dtype="bfloat16", param_dtype="bfloat16")
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw):
        """CPU-test size: vocab 256, d 64, 2 layers (local window 8 + global), 4 heads / 2 KV
        heads of 16, hidden 128, both soft-caps and QK-norm on so every path runs."""
        return cls(**kw)

    @classmethod
    def small(cls, **kw):
        """A somewhat larger CPU config: vocab 512, d 128, 4 layers, 8/2 heads of 32, hidden 512."""
        base = dict(vocab_size=512, d_model=128, num_layers=4, num_heads=8, num_kv_heads=2,
                    head_dim=32, hidden_dim=512, attention_pattern=("local", "local", "global"),
                    sliding_window=16)
        return cls(**{**base, **kw})

    # --- helpers ------------------------------------------------------------------------------
    def with_upcast(self, upcast: bool = True) -> "GemmaConfig":
        """A copy with ``upcast_activations_to_float32`` set."""
        return dataclasses.replace(self, upcast_activations_to_float32=bool(upcast))

    def replace(self, **kw) -> "GemmaConfig":
        return dataclasses.replace(self, **kw)

    @property
    def activation_dtype(self):
        return jnp.dtype(jnp.float32 if self.upcast_activations_to_float32 else self.dtype)

    def layer_kind(self, i: int) -> str:
        if self.sliding_window is None:
            return "global"
        return self.attention_pattern[i % len(self.attention_pattern)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attention_pattern"] = list(self.attention_pattern)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GemmaConfig fields: {sorted(unknown)}")
        return cls(**d)


class Transformer(nnx.Module):
    """Gemma-style decoder.

    * ``model(tokens, lengths=None)``: ``tokens`` int ``[batch, seq]`` -> float32 logits
      ``[batch, seq, vocab]`` (token ``t`` at position ``t``; ``lengths [batch]`` marks right padding).
    * ``init_cache(batch, max_len)`` -> KV cache pytree ``{'k': [L x [B,max_len,K,H]], 'v': ...,
      'lengths': [B] int32}``.
    * ``prefill(tokens, lengths, cache)`` -> ``(last_logits [B, vocab] f32 at position
      lengths-1, cache)``; ``decode_step(tokens [B, Tq], cache)`` -> ``(logits [B, Tq, vocab], cache)``.

    ``impl``: ``'detjax'`` | ``'xla'`` | ``None`` (= the active ``detjax.nn.implementation``,
    default 'detjax'). Parameters are identical either way.
    """

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs | None = None, impl=None):
        if not isinstance(config, GemmaConfig):
            raise TypeError(f"config must be a GemmaConfig; got {type(config).__name__}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = config
        self.config = c
        dt, pdt = c.activation_dtype, jnp.dtype(c.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, impl=impl, rngs=rngs)
        self.embedder = Embed(c.vocab_size, c.d_model, **kw)
        layers = []
        for i in range(c.num_layers):
            local = c.layer_kind(i) == "local"
            layers.append(Block(
                c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim,
                use_post_norms=c.use_post_norms, norm_eps=c.norm_eps,
                query_pre_attn_scalar=c.query_pre_attn_scalar,
                logits_soft_cap=c.attn_logits_soft_cap,
                sliding_window=c.sliding_window if local else None, use_qk_norm=c.use_qk_norm,
                rope_base=c.rope_base_local if local else c.rope_base_global,
                rope_scale_factor=c.rope_scale_factor, attention_kernel=c.attention_kernel, **kw))
        self.layers = nnx.List(layers)
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, **kw)
        self.impl = check_impl(impl)

    # ------------------------------------------------------------------------------------------
    def _embed(self, tokens):
        x = self.embedder(tokens)
        if self.config.embed_scale_by_sqrt_dim:
            x = scale_embedding(x, self.config.d_model, self.impl)
        return x

    def _logits(self, x):
        x = self.final_norm(x)
        return final_logits(self.embedder.attend(x), self.config.final_logits_soft_cap, self.impl)

    @staticmethod
    def _check_tokens(tokens, name="tokens"):
        if not hasattr(tokens, "dtype"):
            tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array; got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape [batch, seq] (rank 2); got shape "
                             f"{tuple(tokens.shape)}")
        return tokens.astype(jnp.int32)

    def __call__(self, tokens, lengths=None, *, return_kv=False):
        tokens = self._check_tokens(tokens)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if lengths is not None:
            lengths = jnp.asarray(lengths, jnp.int32)
        x = self._embed(tokens)
        kvs = []
        for layer in self.layers:
            x, kv = layer(x, positions, lengths)
            kvs.append(kv)
        logits = self._logits(x)
        return (logits, kvs) if return_kv else logits

    # ------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache pytree for ``batch`` sequences of up to ``max_len`` tokens."""
        for n, v in (("batch", batch), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int; got {v!r}")
        c = self.config
        dt = jnp.dtype(dtype) if dtype is not None else c.activation_dtype
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": [jnp.zeros(shape, dt) for _ in range(c.num_layers)],
                "v": [jnp.zeros(shape, dt) for _ in range(c.num_layers)],
                "lengths": jnp.zeros((batch,), jnp.int32)}

    def prefill(self, tokens, lengths, cache):
        """Run right-padded prompts ``tokens [B, T]`` with ``lengths [B]`` (1 <= lengths <= T) into an
        empty ``cache``; returns ``(logits [B, vocab] of the last prompt token, cache)``."""
        tokens = self._check_tokens(tokens)
        b, t = tokens.shape
        lengths = jnp.asarray(lengths, jnp.int32)
        max_len = cache["k"][0].shape[1]
        if t > max_len:
            raise ValueError(f"prompt length {t} exceeds the cache's max_len {max_len}")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(tokens)
        ks, vs = [], []
        for layer, kc, vc in zip(self.layers, cache["k"], cache["v"]):
            x, (k, v) = layer(x, positions, lengths)
            ks.append(jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), 0, axis=1))
            vs.append(jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), 0, axis=1))
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        logits = self._logits(last)
        return logits, {"k": ks, "v": vs, "lengths": lengths}

    def decode_step(self, tokens, cache):
        """Feed ``tokens [B, Tq]`` at positions ``cache['lengths'] ..``; returns
        ``(logits [B, Tq, vocab] f32, cache with lengths + Tq)``."""
        tokens = self._check_tokens(tokens)
        lengths = cache["lengths"]
        x = self._embed(tokens)
        ks, vs = [], []
        for layer, kc, vc in zip(self.layers, cache["k"], cache["v"]):
            x, kc, vc = layer.decode(x, kc, vc, lengths)
            ks.append(kc)
            vs.append(vc)
        logits = self._logits(x)
        return logits, {"k": ks, "v": vs, "lengths": lengths + tokens.shape[1]}
