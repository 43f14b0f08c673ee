"""s10-2 (failed to import the old module), s10-3: decode attention with the per-split states stored for the real rows only (today) vs all
64 rows (session 9's code, from .diag/old), same run; and their bits."""
import importlib.util, sys
import jax, jax.numpy as jnp, numpy as np
from benchmarks.bench_kernels import device_ms
from detjax.ops._attention import decode_attention
import pallas_kernels.attention as K
spec = importlib.util.spec_from_file_location("old_attn", ".diag/old/pallas_kernels/attention.py")
old = importlib.util.module_from_spec(spec); sys.modules["old_attn"] = old; spec.loader.exec_module(old)

def old_decode(q, kc, vc, lengths, cap):
    b, t, n, h = q.shape
    cfg = old.AttnConfig(scale=h ** -0.5, soft_cap=cap, backend="gpu")
    qpos = lengths[:, None] - 1
    pre = old.prepare(q, kc, vc, qpos, lengths, causal=True, sliding_window=None)
    return old.unpack_rows(old.decode_call(*pre, cfg), t, n, h)

key = jax.random.key(7)
shapes = [(8, 768, 640, 4, 256, 8, 50.0), (1, 768, 640, 4, 256, 8, 50.0), (64, 1024, 768, 4, 256, 8, 50.0),
          (1, 8192, 8192, 1, 128, 8, None), (8, 8192, 8192, 4, 128, 8, None), (64, 8192, 8192, 4, 128, 8, None),
          (8, 32768, 32768, 4, 128, 8, None), (1, 32768, 32768, 1, 128, 8, None), (16, 16384, 16384, 1, 256, 8, None)]
for b, s, L, kh, h, n, cap in shapes:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + h), 3)
    q = jax.random.normal(kq, (b, 1, n, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), L, jnp.int32)
    new_f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=cap)
    old_f = lambda q, kc, vc, l: old_decode(q, kc, vc, l, cap)
    same = np.array_equal(np.asarray(jax.jit(new_f)(q, kc, vc, lengths)).view(np.uint16),
                          np.asarray(jax.jit(old_f)(q, kc, vc, lengths)).view(np.uint16))
    t_old = device_ms(old_f, q, kc, vc, lengths, iters=30)
    t_new = device_ms(new_f, q, kc, vc, lengths, iters=30)
    used = 2 * b * L * kh * h * 2
    print(f"decode B{b} S{s} L{L} K{kh} H{h}: before {t_old*1e3:7.1f} us ({used/t_old/1e6:5.0f} GB/s)  "
          f"after {t_new*1e3:7.1f} us ({used/t_new/1e6:5.0f} GB/s)  speed-up {t_old/t_new:.2f}  same bits {same}", flush=True)
