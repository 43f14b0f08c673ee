"""s10-6: a probe for the Mosaic GPU port of detjax attention (not part of the package).

jax's ``attention_mgpu`` forward kernel (wgmma, TMA, two compute warpgroups + one memory
warpgroup), changed to detjax's semantics: rows are detjax's packed (token, query head) rows of one
KV head (``pallas_kernels.attention.prepare``), every row carries its own key interval ``[lo, hi)``
(causal by absolute positions, windows, lengths), and each CTA of 128 rows walks the union of its
rows' KV blocks (``rng``, computed outside), ascending, on the absolute 64-key grid, with no splits.
Questions: does it compile and run; what do the intervals cost against jax's plain causal kernel
and cuDNN; is it batch-invariant; does decode through the same kernel equal prefill bitwise.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import device_ms
from pallas_kernels import attention as K

# As run in s10-6/s10-7, this file defined ``block_ranges`` and ``interval_attention`` (the kernel)
# inline; both moved unchanged into ``pallas_kernels/attention_mgpu.py`` (kernel body identical, checked
# with diff; the as-run file is in git at commit 61d14fe). They are imported from there now.
from pallas_kernels.attention_mgpu import CTA_ROWS, block_ranges  # noqa: E402
from pallas_kernels.attention_mgpu import mosaic_attention_call as interval_attention  # noqa: E402


def detjax_semantics_attention(q, k, v, *, causal=True, window=None, soft_cap=None, q_positions=None,
                               kv_lengths=None, block_kv=64):
    """Public layout in and out: pack rows with detjax's own ``prepare``, run the probe kernel."""
    b, t, n, h = q.shape
    s = k.shape[1]
    qpos = K.default_q_positions(b, t, s) if q_positions is None else q_positions
    kvl = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths
    qp, kp, vp, lo, hi, _ = K.prepare(q, k, v, qpos, kvl, causal=causal, sliding_window=window)
    rp = qp.shape[2]
    rpp = -(-rp // CTA_ROWS) * CTA_ROWS
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rpp - rp), (0, 0)))
    lo, hi = (jnp.pad(a, ((0, 0), (0, rpp - rp))).reshape(b, 1, rpp) for a in (lo, hi))
    kh = k.shape[2]
    lo = jnp.broadcast_to(lo, (b, kh, rpp))
    hi = jnp.broadcast_to(hi, (b, kh, rpp))
    sp = -(-kp.shape[1] // block_kv) * block_kv
    kp, vp = (jnp.pad(a, ((0, 0), (0, sp - a.shape[1]), (0, 0), (0, 0))) for a in (kp, vp))
    o = interval_attention(qp, kp, vp, lo, hi, scale=h ** -0.5, soft_cap=soft_cap, block_kv=block_kv)
    return K.unpack_rows(o[:, :, :rp], t, n, h)


def bits(x):
    return np.asarray(x).view(np.uint16)


def main():
    key = jax.random.key(0)
    dt = jnp.bfloat16
    # 1. accuracy against detjax's Triton kernel, causal and window + soft-cap + lengths
    b, t, n, kh, h = 3, 700, 8, 2, 128
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dt)
    k = jax.random.normal(ks[1], (b, t, kh, h), dt)
    v = jax.random.normal(ks[2], (b, t, kh, h), dt)
    kvl = jnp.array([700, 650, 333], jnp.int32)
    for name, kw in [("causal", {}), ("window 100 + cap 30 + lengths",
                                      dict(window=100, soft_cap=30.0, kv_lengths=kvl))]:
        try:
            got = jax.jit(functools.partial(detjax_semantics_attention, **kw))(q, k, v)
            ref = K.attention_f64_reference(q, k, v, sliding_window=kw.get("window"),
                                            logits_soft_cap=kw.get("soft_cap"),
                                            kv_lengths=kw.get("kv_lengths"))
            trit = __import__("detjax").ops.attention(q, k, v, sliding_window=kw.get("window"),
                                                      logits_soft_cap=kw.get("soft_cap"),
                                                      kv_lengths=kw.get("kv_lengths"))
            mask = np.ones(got.shape, bool)
            if "kv_lengths" in kw:   # rows past a sequence's length are outside the comparison
                mask = (np.arange(t)[None, :] < np.asarray(kvl)[:, None])[:, :, None, None] & mask
            err = np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref))[mask])
            err_t = np.max(np.abs(np.asarray(trit, np.float64) - np.asarray(ref))[mask])
            print(f"accuracy {name}: max |probe - f64| {err:.4f}, max |detjax Triton - f64| {err_t:.4f}", flush=True)
        except Exception as e:
            print(f"accuracy {name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            raise
    # 2. batch invariance and decode = prefill through the same kernel
    f = jax.jit(detjax_semantics_attention)
    full = bits(f(q, k, v))
    one = bits(f(q[1:2], k[1:2], v[1:2]))
    print("batch invariance (row 1 of 3 == alone):", np.array_equal(full[1], one[0]), flush=True)
    ok = 0
    ts = [0, 63, 64, 65, 500, 699]
    for tt in ts:
        d = f(q[:, tt:tt + 1], k, v, q_positions=jnp.full((b, 1), tt, jnp.int32),
              kv_lengths=jnp.full((b,), tt + 1, jnp.int32))
        ok += np.array_equal(bits(d)[:, 0], full[:, tt])
    print(f"decode through the same kernel == prefill bitwise: {ok}/{len(ts)}", flush=True)
    # 3. speed: prefill against cuDNN and the Triton kernel; decode against the Triton decode
    for b, t, h, kh in [(1, 2048, 128, 1), (8, 2048, 128, 4), (1, 8192, 128, 1), (1, 2048, 256, 4),
                        (1, 8192, 256, 4)]:
        ks = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
        q = jax.random.normal(ks[0], (b, t, 8, h), dt)
        k = jax.random.normal(ks[1], (b, t, kh, h), dt)
        v = jax.random.normal(ks[2], (b, t, kh, h), dt)
        cud = device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=10)
        pr = device_ms(lambda q, k, v: detjax_semantics_attention(q, k, v), q, k, v, iters=10)
        tr = device_ms(lambda q, k, v: __import__("detjax").ops.attention(q, k, v), q, k, v, iters=10)
        print(f"prefill B{b} T{t} H{h} K{kh}: cudnn {cud:.3f}  probe {pr:.3f}  triton {tr:.3f} ms"
              f"  | cudnn/probe {cud / pr:.2f}  cudnn/triton {cud / tr:.2f}", flush=True)
    for b, s, kh in [(8, 8192, 4), (64, 8192, 4), (8, 768, 4)]:
        ks = jax.random.split(jax.random.fold_in(key, b * s), 3)
        q = jax.random.normal(ks[0], (b, 1, 8, 128), dt)
        k = jax.random.normal(ks[1], (b, s, kh, 128), dt)
        v = jax.random.normal(ks[2], (b, s, kh, 128), dt)
        lens = jnp.full((b,), s, jnp.int32)
        pos = lens[:, None] - 1
        pr = device_ms(lambda q, k, v: detjax_semantics_attention(q, k, v, q_positions=pos, kv_lengths=lens),
                       q, k, v, iters=20)
        tr = device_ms(lambda q, k, v: __import__("detjax").ops.decode_attention(q, k, v, lens), q, k, v, iters=20)
        print(f"decode B{b} cache {s} K{kh}: probe {pr * 1e3:.1f} us  triton split decode {tr * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
