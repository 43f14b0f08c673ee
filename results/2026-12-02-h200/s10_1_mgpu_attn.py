"""s10-1: what the Mosaic GPU route gives on the attention issue's prefill shapes: jax's own
attention_mgpu (wgmma, TMA, warp specialisation) against cuDNN and XLA, f16 and bf16, causal;
plus its batch invariance (row of a batch vs alone) and block_kv 64 vs 128."""
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas.ops.gpu import attention_mgpu as am
from benchmarks.bench_kernels import device_ms
from detjax.ops._attention import attention

key = jax.random.key(3)
shapes = [(1, 2048, 128, 1), (1, 2048, 256, 4), (8, 2048, 128, 4), (1, 8192, 128, 1), (8, 8192, 128, 4),
          (1, 8192, 256, 4)]
for dt in (jnp.float16,):
    for b, t, h, kh in shapes:
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
        q = jax.random.normal(kq, (b, t, 8, h), dt)
        k = jax.random.normal(kk, (b, t, kh, h), dt)
        v = jax.random.normal(kv, (b, t, kh, h), dt)
        res = {}
        for impl in ("xla", "cudnn"):
            try:
                res[impl] = device_ms(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation=impl), q, k, v, iters=10)
            except Exception as e:
                res[impl] = float("nan"); print("  ", impl, type(e).__name__, str(e)[:120])
        for bkv in (64, 128):
            try:
                cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=True)
                scale = h ** -0.5
                res[f"mgpu{bkv}"] = device_ms(lambda q, k, v, cfg=cfg: am.attention(q * scale, k, v, cfg), q, k, v, iters=10)
            except Exception as e:
                res[f"mgpu{bkv}"] = float("nan"); print("  mgpu", bkv, type(e).__name__, str(e)[:200])
        try:
            res["detjax"] = device_ms(lambda q, k, v: attention(q, k, v, causal=True), q, k, v, iters=10)
        except Exception as e:
            res["detjax"] = float("nan"); print("  detjax", type(e).__name__, str(e)[:200])
        best = min(res["xla"], res["cudnn"])
        print(f"{jnp.dtype(dt).name} B{b} T{t} H{h} K{kh}: " + "  ".join(f"{k} {v:.3f}" for k, v in res.items())
              + f"  | best/mgpu64 {best/res['mgpu64']:.2f} best/mgpu128 {best/res['mgpu128']:.2f} best/detjax {best/res['detjax']:.2f}", flush=True)
# batch invariance of the mgpu kernel: row 3 of a batch of 8 vs alone; and vs detjax bits
b, t, h, kh = 8, 1024, 128, 4
kq, kk, kv = jax.random.split(jax.random.key(11), 3)
q = jax.random.normal(kq, (b, t, 8, h), jnp.float16) * 0.088
k = jax.random.normal(kk, (b, t, kh, h), jnp.float16)
v = jax.random.normal(kv, (b, t, kh, h), jnp.float16)
cfg = am.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
full = np.asarray(am.attention(q, k, v, cfg))
one = np.asarray(am.attention(q[3:4], k[3:4], v[3:4], cfg))
print("mgpu batch invariance (row 3 of 8 == alone):", np.array_equal(full[3].view(np.uint16), one[0].view(np.uint16)))
ours = np.asarray(attention(q, k, v, causal=True, scale=1.0))
print("mgpu bits == detjax bits:", np.array_equal(full.view(np.uint16), ours.view(np.uint16)),
      "max abs diff", float(np.max(np.abs(full.astype(np.float32) - ours.astype(np.float32)))))
