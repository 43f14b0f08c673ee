"""Attention benchmarks (called from bench_kernels.py --only attn): prefill against
jax.nn.dot_product_attention ('xla' and 'cudnn') on the attention issue's shapes (B 1/8, T = S
2048/8192, head dim 128/256, N = 8, K = 1/4, causal), decode as achieved HBM bandwidth, and one
training step (forward + backward). On a Hopper GPU each shape also gets a row for the opt-in
Mosaic GPU kernel (detjax.experimental)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from detjax.ops._attention import attention, decode_attention


def decode_case(key, b, s, kh, h, dtype=jnp.bfloat16, ragged=False):
    """One new token x 8 query heads against a ``[b, s, kh, h]`` KV cache: ``(q, k_cache, v_cache,
    lengths)``, full caches or ragged lengths in ``[1, s]`` (also used by decode_breakdown.py)."""
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), dtype)
    kc = jax.random.normal(kk, (b, s, kh, h), dtype)
    vc = jax.random.normal(kv, (b, s, kh, h), dtype)
    lengths = ((jnp.arange(b, dtype=jnp.int32) * 997) % s + 1 if ragged
               else jnp.full((b,), s, jnp.int32))
    return q, kc, vc, lengths


def xla_decode(q, kc, vc, lengths):
    """XLA's decode baseline: ``jax.nn.dot_product_attention`` ('xla') with a length mask."""
    mask = (jnp.arange(kc.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
    return jax.nn.dot_product_attention(q, kc, vc, mask=mask, implementation="xla")


def _emit(rows, row):
    """Keep a row and print it at once (a run cut short by a time limit still reports it)."""
    rows.append(row)
    print(f"  {row['name']:44s} base {row['xla_ms']:9.4f} ms  ours {row['detjax_ms']:9.4f} ms  "
          f"ratio {row['ratio']:5.2f}", flush=True)


def run(rows, iters, quick, copy_gbs, device_ms):
    key = jax.random.key(3)
    from detjax.experimental import mosaic_attention, mosaic_available, mosaic_decode_attention
    mosaic_ok = mosaic_available()[0]
    prefill = [(b, t, h, kh) for t in (2048, 8192) for b in (1, 8) for h in (128, 256) for kh in (1, 4)]
    if quick:
        prefill = [(1, 2048, 128, 1)]
    for b, t, h, kh in prefill:
        n = 8
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
        q = jax.random.normal(kq, (b, t, n, h), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
        best, best_name = None, None
        for impl in ("xla", "cudnn"):
            try:
                ms = device_ms(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation=impl), q, k, v, iters=iters)
            except Exception as e:  # cudnn may reject a shape: report and continue
                print(f"prefill {impl} B={b} T={t} H={h} K={kh}: {type(e).__name__}")
                continue
            if best is None or ms < best:
                best, best_name = ms, impl
        ours = device_ms(lambda q, k, v: attention(q, k, v, causal=True), q, k, v, iters=iters)
        flops = 4 * b * n * t * t * h / 2  # causal
        _emit(rows, dict(kind="attn", name=f"prefill B{b} T{t} H{h} N8 K{kh} vs {best_name}",
                         xla_ms=best, detjax_ms=ours, ratio=best / ours, tflops=flops / ours / 1e9,
                         gbs=0.0, bound="flops"))
        if mosaic_ok:   # the opt-in Mosaic GPU kernel (detjax.experimental), same baseline
            ms = device_ms(lambda q, k, v: mosaic_attention(q, k, v), q, k, v, iters=iters)
            _emit(rows, dict(kind="attn", name=f"prefill B{b} T{t} H{h} N8 K{kh} mosaic vs {best_name}",
                             xla_ms=best, detjax_ms=ms, ratio=best / ms, tflops=flops / ms / 1e9,
                             gbs=0.0, bound="flops"))
    # (B, cache, K, H): the attention issue's rows at head dim 128, then gemma2_2b's decode shape
    # (head dim 256, 4 KV heads) at the cache of a 512-token prompt + 256 new tokens and at 8k
    decode = [(1, 8192, 1, 128), (8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128),
              (64, 1024, 4, 128), (8, 768, 4, 256), (8, 8192, 4, 256)]
    if quick:
        decode = decode[:2]
    for b, s, kh, h in decode:
        q, kc, vc, lengths = decode_case(key, b, s, kh, h)
        t_x = device_ms(xla_decode, q, kc, vc, lengths, iters=iters)
        t_d = device_ms(lambda q, kc, vc, l: decode_attention(q, kc, vc, l), q, kc, vc, lengths,
                        iters=iters)
        bytes_ = kc.nbytes + vc.nbytes
        gbs = bytes_ / t_d / 1e6
        _emit(rows, dict(kind="attn", name=f"decode B{b} cache{s} K{kh} H{h}", xla_ms=t_x,
                         detjax_ms=t_d, ratio=t_x / t_d, gbs=gbs, pct_ceiling=100 * gbs / copy_gbs,
                         bound="bytes"))
        if mosaic_ok:
            t_m = device_ms(lambda q, kc, vc, l: mosaic_decode_attention(q, kc, vc, l), q, kc, vc,
                            lengths, iters=iters)
            gbs = bytes_ / t_m / 1e6
            _emit(rows, dict(kind="attn", name=f"decode B{b} cache{s} K{kh} H{h} mosaic", xla_ms=t_x,
                             detjax_ms=t_m, ratio=t_x / t_m, gbs=gbs,
                             pct_ceiling=100 * gbs / copy_gbs, bound="bytes"))
    train(rows, iters, key, device_ms, mosaic_ok)


def train(rows, iters, key, device_ms, mosaic_ok):
    """Forward + backward (grads of q, k, v) of causal attention, against cuDNN's (GPU only)."""
    if jax.default_backend() != "gpu":
        return
    from detjax.experimental import mosaic_attention
    b, t, n, h, kh = 1, 2048, 8, 128, 4
    kq, kk, kv, kw = jax.random.split(jax.random.fold_in(key, 77), 4)
    q = jax.random.normal(kq, (b, t, n, h), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
    w = jax.random.normal(kw, (b, t, n, h), jnp.float32)

    def grad_of(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2))

    t_c = device_ms(grad_of(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")), q, k, v, iters=iters)
    flops = 4 * b * n * t * t * h / 2 * 3.5    # forward + backward (2.5x the forward's dots)
    cases = [("detjax", lambda q, k, v: attention(q, k, v, causal=True))]
    if mosaic_ok:
        cases.append(("mosaic", lambda q, k, v: mosaic_attention(q, k, v)))
    for name, fn in cases:
        ms = device_ms(grad_of(fn), q, k, v, iters=iters)
        _emit(rows, dict(kind="attn", name=f"fwd+bwd B{b} T{t} H{h} K{kh} {name} vs cudnn", xla_ms=t_c,
                         detjax_ms=ms, ratio=t_c / ms, tflops=flops / ms / 1e9, gbs=0.0, bound="flops"))
