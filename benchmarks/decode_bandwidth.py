"""Decode attention as achieved HBM bandwidth over the attention issue's grid (GPU only).

One new token x 8 query heads, full caches, bf16: batch 1 / 8 / 64, caches of 1k / 8k / 32k keys,
4 KV heads at head dim 128 (the grid), plus batch 1 with one KV head (MQA, the smallest read per
step) and head dim 256 (gemma2_2b's). Each row: XLA (``jax.nn.dot_product_attention`` 'xla' with a
length mask, ``bench_attention.xla_decode``) and ``detjax.ops.decode_attention`` (the default split
decode), CUPTI device time (a compile call, a warm-up call, median of ``--iters``), the K/V bytes
over the time as GB/s and as % of the copy bandwidth measured in the same process
(``bench_kernels.copy_bandwidth_gbs``: read + write of a 1 GiB buffer). The issue's target: >= 70%
of copy for caches >= 8k. The last lines name the rows that meet it.

Run from the repo root: python benchmarks/decode_bandwidth.py [--iters N] [--quick]
(``--quick``: the three 8k rows at head dim 128.)
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp

from benchmarks.bench_attention import decode_case, xla_decode
from benchmarks.bench_kernels import copy_bandwidth_gbs, device_ms
from detjax.ops._attention import decode_attention

#: (B, cache, K, H)
GRID = ([(b, s, 4, 128) for s in (1024, 8192, 32768) for b in (1, 8, 64)]
        + [(1, 8192, 1, 128), (1, 32768, 1, 128), (8, 8192, 4, 256), (1, 32768, 4, 256)])
TARGET_PCT = 70.0


def main(argv):
    if jax.default_backend() != "gpu":
        sys.exit(f"decode_bandwidth.py needs a GPU; the default backend is {jax.default_backend()!r}")
    iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
    grid = [(b, 8192, 4, 128) for b in (1, 8, 64)] if "--quick" in argv else GRID
    copy = copy_bandwidth_gbs(iters)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, copy {copy:.0f} GB/s")
    print(f"{'decode shape':26s} {'K/V MB':>7s} {'XLA us':>8s} {'detjax us':>9s} {'ratio':>6s} "
          f"{'GB/s':>6s} {'% copy':>7s} {'XLA %':>6s}")
    met, missed = [], []
    for b, s, kh, h in grid:
        q, kc, vc, lengths = decode_case(jax.random.key(4), b, s, kh, h)
        mb = (kc.nbytes + vc.nbytes) / 1e6
        t_x = device_ms(xla_decode, q, kc, vc, lengths, iters=iters)
        t_d = device_ms(lambda q, kc, vc, l: decode_attention(q, kc, vc, l), q, kc, vc, lengths,
                        iters=iters)
        pct, pct_x = 100 * mb / t_d / copy, 100 * mb / t_x / copy
        name = f"B{b} cache{s} K{kh} H{h}"
        print(f"{name:26s} {mb:7.1f} {t_x * 1e3:8.1f} {t_d * 1e3:9.1f} {t_x / t_d:6.2f} "
              f"{mb / t_d:6.0f} {pct:6.1f}% {pct_x:5.1f}%", flush=True)
        if s >= 8192:
            (met if pct >= TARGET_PCT else missed).append(f"{name} ({pct:.0f}%)")
        del q, kc, vc
    print(f"caches >= 8k at >= {TARGET_PCT:.0f}% of copy: {len(met)} of {len(met) + len(missed)}")
    print("  met:    " + ", ".join(met))
    print("  missed: " + ", ".join(missed))


if __name__ == "__main__":
    main(sys.argv[1:])
