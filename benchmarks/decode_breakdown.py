"""Where a decode call's device time goes (GPU only; written in session 18, not yet run).

1. For each decode shape (one token x 8 query heads, full caches, bf16): the CUPTI time of every
   kernel of one call (median over 10 calls) of XLA (``jax.nn.dot_product_attention``,
   implementation 'xla', length mask), the default (Triton) split decode and the opt-in Mosaic GPU
   decode; % of copy for the K/V bytes over the whole call and over its attention kernels alone
   (the rest is the small XLA kernels around them: q packing, row intervals, output slicing).
2. The A/B of ``pallas_kernels.attention.DECODE_UNPADDED_ROWS`` (off / on): time at full caches
   and the bits at ragged lengths (bf16, and f16 at one shape). The switch stays off until this
   shows the same bits on the GPU and a gain.
3. With ``--value-splits``: decode with ``DECODE_TARGET_PROGRAMS`` x1/x2/x4 (bit-neutral value
   splits at more programs), time and bits.

Run from the repo root: python benchmarks/decode_breakdown.py [COPY_GBS] [--ab-only] [--value-splits]
(COPY_GBS: the copy bandwidth for the %; default 3028, the H100's of session 17.)
"""
import statistics
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from detjax.experimental import mosaic_decode_attention
from detjax.ops._attention import decode_attention

if jax.default_backend() != "gpu":
    sys.exit(f"decode_breakdown.py needs a GPU (CUPTI per-kernel times); the default backend is "
             f"{jax.default_backend()!r}")
args = [a for a in sys.argv[1:] if not a.startswith('--')]
copy = float(args[0]) if args else 3028.0


def breakdown(f, *args, iters=10):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    _, per_iter = profiler.measure(f, aggregate=False, iterations=iters)(*args)
    names = [n for n, _ in per_iter[0]]
    return [(n, statistics.median(it[i][1] for it in per_iter)) for i, n in enumerate(names)]


key = jax.random.key(4)
for b, s, kh, h in ([] if "--ab-only" in sys.argv else
                    [(8, 8192, 4, 128), (1, 8192, 1, 128), (8, 8192, 4, 256), (8, 768, 4, 256)]):
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)

    def xla(q, kc, vc, lengths, s=s):
        m = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        return jax.nn.dot_product_attention(q, kc, vc, mask=m, implementation="xla")

    mb = (kc.nbytes + vc.nbytes) / 1e6
    print(f"== decode B{b} cache{s} K{kh} H{h} ({mb:.0f} MB of K/V)", flush=True)
    for name, f in [("xla", xla), ("default", lambda q, kc, vc, l: decode_attention(q, kc, vc, l)),
                    ("mosaic", lambda q, kc, vc, l: mosaic_decode_attention(q, kc, vc, l))]:
        ks = breakdown(f, q, kc, vc, lengths)
        tot = sum(t for _, t in ks)
        attn = sum(t for n, t in ks if "attention" in n or "decode" in n)
        print(f"  {name:8s} total {tot*1e3:7.1f} us ({100*mb/tot/copy:5.1f}% copy); "
              f"attention kernels {attn*1e3:7.1f} us ({100*mb/attn/copy if attn else 0:5.1f}%)")
        for n, t in ks:
            print(f"      {t*1e3:7.1f} us  {n[:90]}")

# Value splits (bit-neutral, GPU-tested) at more programs than DECODE_TARGET_PROGRAMS allows today:
# does re-reading K for more parallelism pay at batch 8 / long caches? (bits checked against 264)
from benchmarks.bench_kernels import device_ms
from pallas_kernels import attention as _k

print("== unpadded decode rows (DECODE_UNPADDED_ROWS) on / off: time and bits", flush=True)
for b, s, kh, h, dt in [(8, 8192, 4, 128, jnp.bfloat16), (8, 32768, 4, 128, jnp.bfloat16),
                        (1, 8192, 1, 128, jnp.bfloat16), (8, 768, 4, 256, jnp.bfloat16),
                        (8, 768, 4, 256, jnp.float16), (64, 8192, 4, 128, jnp.bfloat16)]:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), dt)
    kc = jax.random.normal(kk, (b, s, kh, h), dt)
    vc = jax.random.normal(kv, (b, s, kh, h), dt)
    lengths = (jnp.arange(b, dtype=jnp.int32) * 997) % s + 1  # ragged
    mb = (kc.nbytes + vc.nbytes) / 1e6
    res = {}
    for flag in (False, True):
        _k.DECODE_UNPADDED_ROWS = flag
        f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l)  # noqa: E731 (a new trace per flag)
        out = jax.jit(f)(q, kc, vc, lengths)
        full = jnp.full((b,), s, jnp.int32)
        res[flag] = (jax.lax.bitcast_convert_type(out, jnp.uint16), device_ms(f, q, kc, vc, full, iters=10))
    _k.DECODE_UNPADDED_ROWS = True
    same = bool(jnp.all(res[False][0] == res[True][0]))
    print(f"  {jnp.dtype(dt).name} B{b} cache{s} K{kh} H{h}: padded {res[False][1]*1e3:.1f} us ({100*mb/res[False][1]/copy:.1f}%) "
          f"unpadded {res[True][1]*1e3:.1f} us ({100*mb/res[True][1]/copy:.1f}%) "
          f"{res[False][1]/res[True][1]:.3f}x, ragged-length bits same={same}", flush=True)

if "--value-splits" not in sys.argv:
    sys.exit(0)
print("== value splits vs DECODE_TARGET_PROGRAMS", flush=True)
default_target = _k.DECODE_TARGET_PROGRAMS
for b, s, kh, h in [(8, 8192, 4, 128), (8, 32768, 4, 128), (1, 32768, 4, 128), (1, 8192, 1, 128),
                    (8, 8192, 4, 256)]:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
    q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    mb = (kc.nbytes + vc.nbytes) / 1e6
    ref = None
    line = f"  B{b} cache{s} K{kh} H{h}:"
    for target in (default_target, 2 * default_target, 4 * default_target):
        _k.DECODE_TARGET_PROGRAMS = target
        f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l)  # noqa: E731 (a new trace per target)
        out = jax.jit(f)(q, kc, vc, lengths)
        ref = out if ref is None else ref
        same = bool(jnp.all(jax.lax.bitcast_convert_type(out, jnp.uint16)
                            == jax.lax.bitcast_convert_type(ref, jnp.uint16)))
        t = device_ms(f, q, kc, vc, lengths, iters=10)
        line += f" target {target}: {t*1e3:.1f} us {100*mb/t/copy:.1f}% same={same} |"
    _k.DECODE_TARGET_PROGRAMS = default_target
    print(line, flush=True)
