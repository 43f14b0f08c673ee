"""Session 17: (num_warps, num_stages) of the decode split kernel at long caches, on the H100.

The attention issue's decode target is >= 70% of the copy bandwidth for caches >= 8k; session 10
(H100 s10-5) measured 63% at B8 cache 8192 head dim 128 with the default (4 warps, 2 stages). Warps
(4 or 8) and pipeline depth were measured not to change bits (s4-4, s6-3, s15-1); this sweep
checks that again on every shape it times (ragged lengths; soft cap 50 at head dim 256) and reports
device time (CUPTI, median) and % of the copy bandwidth.

Run from the repo root: python results/2026-12-07-h100/s17_decode_sweep.py
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import copy_bandwidth_gbs, device_ms
from detjax.ops._attention import decode_attention
from pallas_kernels import attention as K


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


copy = copy_bandwidth_gbs(10)
print(f"device {jax.devices()[0].device_kind}  copy ceiling {copy:.0f} GB/s", flush=True)
orig = K.gpu_config
key = jax.random.key(17)
shapes = [(8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128), (1, 32768, 1, 128),
          (8, 8192, 4, 256)]
for b, s, kh, h in shapes:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.asarray([s - (i % 3) for i in range(b)], jnp.int32)
    cap = 50.0 if h == 256 else None
    f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=cap)  # noqa: E731
    gb = (kc.nbytes + vc.nbytes) / 1e6
    K.gpu_config = orig
    jax.clear_caches()
    base_t, base = device_ms(f, q, kc, vc, lengths), jax.jit(f)(q, kc, vc, lengths)
    ne = K.decode_value_splits(h, b * kh * (-(-s // K.ATTN_SPLIT_K)), jnp.bfloat16)
    line = [f"default {orig(h // ne, 'decode', jnp.bfloat16)} {base_t*1e3:6.1f} us "
            f"({100*gb/base_t/copy:4.1f}%)"]
    for cfg in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4)):
        K.gpu_config = lambda hp, kernel="prefill", dtype=None, cfg=cfg: (
            cfg if kernel == "decode" else orig(hp, kernel, dtype))
        jax.clear_caches()
        try:
            t, o = device_ms(f, q, kc, vc, lengths), jax.jit(f)(q, kc, vc, lengths)
            same = bool(np.array_equal(bits(o), bits(base)))
            line.append(f"{cfg} {t*1e3:6.1f} us ({100*gb/t/copy:4.1f}%) same={same}")
        except Exception as e:   # a configuration may not fit the shared memory
            line.append(f"{cfg} failed {type(e).__name__}")
    print(f"sweep B{b} cache{s} K{kh} H{h} E{ne}: " + " | ".join(line), flush=True)
K.gpu_config = orig
