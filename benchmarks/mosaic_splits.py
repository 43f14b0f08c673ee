"""The Mosaic GPU attention with fixed-size key splits: speed against cuDNN / XLA and against the
same kernel without splits, and its bits (GPU only).

Session 23 gave ``pallas_kernels/attention_mgpu.py`` the attention order's key splits, opt-in
(``splits=True``; ``attention_mgpu.SPLITS`` says why not yet the default): ``ATTN_SPLIT_K`` keys
anchored at key 0, each folded from the empty state, merged into the running total in ascending
order. Prefill merges inside its CTAs (the running total's accumulator in a float32
global-memory scratch, merged 64 columns at a time); decode runs one CTA per (row block, split)
and a merge kernel (``merge_call``) with the same merge code, meant to give decode = prefill by
construction while small-batch decode is no longer one CTA walking the whole cache.

Rows (CUPTI device time: a compile call, a warm-up call, median of ``--iters``; bf16, N = 8):

* prefill, causal, T = S, the attention issue's 16 shapes: cuDNN (``jax.nn.dot_product_attention``
  'cudnn', the faster of cuDNN and XLA at every one of these shapes in sessions 17-22), the Mosaic
  kernel with splits (``splits=True``) and without (``splits=False``, the default, the order of
  sessions 10-22), as ratios cuDNN / kernel;
* decode, one new token x 8 query heads, full caches: XLA (``bench_attention.xla_decode``),
  ``detjax.ops.decode_attention`` (the default Triton path), the Mosaic decode with splits
  (split-parallel + merge) and without, as % of the copy bandwidth measured in the same process;
* bits: the split-parallel decode against the one-kernel merge (``split_parallel=False``) at each
  decode shape, and decode = prefill for tokens on and across split boundaries.

Run from the repo root: python benchmarks/mosaic_splits.py [--iters N] [--quick]
(``--quick``: four prefill and three decode shapes.)
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import decode_case, xla_decode
from benchmarks.bench_kernels import bits, copy_bandwidth_gbs, device_ms
from detjax.ops._attention import decode_attention
from pallas_kernels import attention as _k
from pallas_kernels import attention_mgpu as M

PREFILL = [(b, t, h, kh) for h in (128, 256) for t in (2048, 8192) for b in (1, 8) for kh in (1, 4)]
PREFILL_QUICK = [(8, 8192, 128, 4), (8, 8192, 256, 4), (1, 8192, 128, 4), (1, 2048, 256, 1)]
DECODE = [(1, 8192, 1, 128), (1, 32768, 1, 128), (8, 8192, 4, 128), (8, 32768, 4, 128),
          (64, 8192, 4, 128), (8, 8192, 4, 256), (8, 768, 4, 256)]
#: decode = prefill positions: on and across block (64 / 128 keys) and split (1024) boundaries
POSITIONS = (5, 127, 128, 1022, 1023, 1024, 1025, 1535, 2047, 2048, 2049, 2199)
DECODE_QUICK = [(1, 8192, 1, 128), (8, 8192, 4, 128), (8, 8192, 4, 256)]


def mosaic(q, k, v, pos, lens, **kw):
    """``M.forward``'s output, with the key splits unless ``splits=False`` is passed."""
    kw.setdefault("splits", True)
    return M.forward(q, k, v, pos, lens, causal=True, sliding_window=None, soft_cap=None,
                     scale=q.shape[-1] ** -0.5, **kw)[0]


def prefill_rows(shapes, iters):
    print("== prefill, causal bf16, N = 8 (ms; ratio = cuDNN / kernel) ==")
    print(f"{'shape':22s} {'cuDNN':>8s} {'splits':>8s} {'ratio':>6s} {'no splits':>9s} {'ratio':>6s}")
    worst = []
    for b, t, h, kh in shapes:
        kq, kk, kv = jax.random.split(jax.random.key(b * t + h + kh), 3)
        q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
        pos = _k.default_q_positions(b, t, t)
        lens = jnp.full((b,), t, jnp.int32)
        t_c = device_ms(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                     implementation="cudnn"),
                        q, k, v, iters=iters)
        t_s = device_ms(lambda *a: mosaic(*a), q, k, v, pos, lens, iters=iters)
        t_n = device_ms(lambda *a: mosaic(*a, splits=False), q, k, v, pos, lens, iters=iters)
        worst.append(t_c / t_s)
        print(f"B{b} T{t} H{h} K{kh}".ljust(22) + f" {t_c:8.4f} {t_s:8.4f} {t_c / t_s:6.2f} "
              f"{t_n:9.4f} {t_c / t_n:6.2f}", flush=True)
        del q, k, v
    return min(worst)


def split_decode(*a):
    """The Mosaic decode with splits: split-parallel CTAs and the merge kernel."""
    return mosaic(*a, layout="packed")


def unsplit_decode(*a):
    return mosaic(*a, layout="packed", splits=False)


@jax.jit
def one_kernel_decode(*a):
    """The same splits merged inside one kernel (prefill's form)."""
    return mosaic(*a, layout="packed", split_parallel=False)


def decode_rows(shapes, iters, copy):
    print(f"== decode, 1 token x 8 query heads, full caches, bf16 (us; % of copy {copy:.0f} GB/s) ==")
    print(f"{'shape':22s} {'K/V MB':>7s} {'XLA':>13s} {'default':>13s} {'Mosaic splits':>14s} "
          f"{'no splits':>13s} {'bits sp=1k':>10s}")
    ok = True
    for b, s, kh, h in shapes:
        q, kc, vc, lengths = decode_case(jax.random.key(4), b, s, kh, h)
        pos = (lengths[:, None] - 1).astype(jnp.int32)
        mb = (kc.nbytes + vc.nbytes) / 1e6
        cell = lambda ms: f"{ms * 1e3:7.1f} {100 * mb / ms / copy:4.0f}%"  # noqa: E731
        t_x = device_ms(xla_decode, q, kc, vc, lengths, iters=iters)
        t_d = device_ms(lambda q, kc, vc, l: decode_attention(q, kc, vc, l), q, kc, vc, lengths, iters=iters)
        args = (q, kc, vc, pos, lengths)
        t_s = device_ms(split_decode, *args, iters=iters)
        t_n = device_ms(unsplit_decode, *args, iters=iters)
        same = bool(np.array_equal(bits(jax.jit(split_decode)(*args)), bits(one_kernel_decode(*args))))
        ok &= same
        print(f"B{b} cache{s} K{kh} H{h}".ljust(22) + f" {mb:7.1f} {cell(t_x)} {cell(t_d)} "
              f"{cell(t_s):>14s} {cell(t_n)} {'same' if same else 'DIFFER':>10s}", flush=True)
        del q, kc, vc
    return ok


def decode_equals_prefill():
    """Decode (split-parallel + merge kernel) of tokens on and across split boundaries equals the
    prefill's rows (one kernel, merges inside the CTAs), bf16 at head dims 64 / 128 / 256."""
    ok = True
    decode = jax.jit(split_decode)   # one compilation per head dim, not per position
    for h in (64, 128, 256):
        s = 2200
        kq, kk, kv = jax.random.split(jax.random.key(h), 3)
        q = jax.random.normal(kq, (2, s, 8, h), jnp.bfloat16)
        k = jax.random.normal(kk, (2, s, 2, h), jnp.bfloat16)
        v = jax.random.normal(kv, (2, s, 2, h), jnp.bfloat16)
        full = bits(jax.jit(mosaic)(q, k, v, _k.default_q_positions(2, s, s), jnp.full((2,), s, jnp.int32)))
        pad = ((0, 0), (0, 2304 - s), (0, 0), (0, 0))
        kc, vc = jnp.pad(k, pad), jnp.pad(v, pad)
        bad = []
        for t in POSITIONS:
            lengths = jnp.array([t + 1, min(s, t + 300)], jnp.int32)
            qd = jnp.stack([q[0, t:t + 1], q[1, int(lengths[1]) - 1:int(lengths[1])]])
            d = bits(decode(qd, kc, vc, lengths[:, None] - 1, lengths))
            if not (np.array_equal(d[0, 0], full[0, t]) and np.array_equal(d[1, 0], full[1, int(lengths[1]) - 1])):
                bad.append(t)
        print(f"decode = prefill, H{h}, t on and across split boundaries: "
              f"{'same bits' if not bad else f'DIFFER at t = {bad}'}", flush=True)
        ok &= not bad
    return ok


def main(argv):
    if jax.default_backend() != "gpu":
        sys.exit(f"mosaic_splits.py needs a GPU; the default backend is {jax.default_backend()!r}")
    iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
    quick = "--quick" in argv
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    ok = decode_equals_prefill()
    worst = prefill_rows(PREFILL_QUICK if quick else PREFILL, iters)
    copy = copy_bandwidth_gbs(iters)
    ok &= decode_rows(DECODE_QUICK if quick else DECODE, iters, copy)
    print(f"prefill with splits: worst ratio to cuDNN {worst:.2f}; bits: {'all same' if ok else 'SOME DIFFER'}")


if __name__ == "__main__":
    main(sys.argv[1:])
