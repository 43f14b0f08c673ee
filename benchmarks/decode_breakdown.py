"""Where a decode call's device time goes (GPU only; written in session 18, not yet run).

1. For each decode shape (one token x 8 query heads, full caches, bf16): the CUPTI time of every
   kernel of one call (median over 10 calls) of XLA (``jax.nn.dot_product_attention``,
   implementation 'xla', length mask), the default (Triton) split decode and the opt-in Mosaic GPU
   decode; % of copy for the K/V bytes over the whole call and over its attention kernels alone
   (the rest is the small XLA kernels around them: q packing, row intervals, output slicing).
2. The A/B of ``pallas_kernels.attention.DECODE_UNPADDED_ROWS`` (off / on): time at full caches
   and the bits at ragged lengths (bf16, and f16 at one shape). The switch stays off until this
   shows the same bits on the GPU and a gain.
3. With ``--merge-unroll``: ``DECODE_MERGE_UNROLL`` 1 / 4 / 8 (the merge kernel's splits written
   out in groups; bit-neutral), time and bits (``--merge-only``: this A/B alone).
4. With ``--value-splits``: decode with ``DECODE_TARGET_PROGRAMS`` x1/x2/x4 (bit-neutral value
   splits at more programs), time and bits.

Run from the repo root: python benchmarks/decode_breakdown.py [COPY_GBS] [--ab-only] [--merge-unroll | --merge-only] [--value-splits]
(COPY_GBS: the copy bandwidth for the %; default 3028, the H100's of session 17.)
"""
import statistics
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import decode_case, xla_decode
from benchmarks.bench_kernels import bits, output_and_ms
from detjax.experimental import mosaic_decode_attention
from detjax.ops._attention import decode_attention
from pallas_kernels import attention as _k


def breakdown(f, *args, iters=10):
    """``[(kernel name, median ms)]`` of every kernel one call of the jitted ``f`` launches."""
    from jax.experimental.mosaic.gpu import profiler
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    _, per_iter = profiler.measure(f, aggregate=False, iterations=iters)(*args)
    names = [n for n, _ in per_iter[0]]
    return [(n, statistics.median(it[i][1] for it in per_iter)) for i, n in enumerate(names)]


def case(b, s, kh, h, dtype=jnp.bfloat16, ragged=False):
    """``bench_attention.decode_case`` (fixed key) and its K/V megabytes."""
    q, kc, vc, lengths = decode_case(jax.random.key(4), b, s, kh, h, dtype, ragged)
    return q, kc, vc, lengths, (kc.nbytes + vc.nbytes) / 1e6


def default(q, kc, vc, lengths):
    return decode_attention(q, kc, vc, lengths)


def bits_and_time(name, value, q, kc, vc, bit_lengths, time_lengths):
    """With ``pallas_kernels.attention.<name> = value`` (traced afresh, then restored): the default
    decode's output bits at ``bit_lengths`` and its device time (ms) at ``time_lengths``."""
    out, ms = output_and_ms(default, (q, kc, vc, time_lengths), {name: value},
                            out_args=(q, kc, vc, bit_lengths))
    return bits(out), ms


def sweep_line(label, name, values, q, kc, vc, bit_lengths, time_lengths, pct):
    """One printed line: time, % of copy and bits (against the first value's) per setting value."""
    line, ref = label, None
    for value in values:
        out, t = bits_and_time(name, value, q, kc, vc, bit_lengths, time_lengths)
        ref = out if ref is None else ref
        line += f" {value}: {t*1e3:.1f} us {pct(t):.1f}% same={bool(np.array_equal(out, ref))} |"
    print(line, flush=True)


def main(argv):
    if jax.default_backend() != "gpu":
        sys.exit(f"decode_breakdown.py needs a GPU (CUPTI per-kernel times); the default backend is "
                 f"{jax.default_backend()!r}")
    args = [a for a in argv if not a.startswith("--")]
    copy = float(args[0]) if args else 3028.0
    pct = lambda mb, ms: 100 * mb / ms / copy  # noqa: E731

    merge_only = "--merge-only" in argv   # the merge-unroll A/B alone
    for shape in ([] if "--ab-only" in argv or merge_only else
                  [(8, 8192, 4, 128), (1, 8192, 1, 128), (8, 8192, 4, 256), (8, 768, 4, 256)]):
        *ops, mb = case(*shape)
        print(f"== decode B{shape[0]} cache{shape[1]} K{shape[2]} H{shape[3]} ({mb:.0f} MB of K/V)",
              flush=True)
        for name, f in [("xla", xla_decode), ("default", default), ("mosaic", mosaic_decode_attention)]:
            ks = breakdown(f, *ops)
            tot = sum(t for _, t in ks)
            attn = sum(t for n, t in ks if any(w in n for w in ("attention", "decode", "mosaic_gpu")))
            print(f"  {name:8s} total {tot*1e3:7.1f} us ({pct(mb, tot):5.1f}% copy); attention kernels "
                  f"{attn*1e3:7.1f} us ({pct(mb, attn) if attn else 0:5.1f}%)")
            for n, t in ks:
                print(f"      {t*1e3:7.1f} us  {n[:90]}")

    unpadded_ab = [] if merge_only else [
        (8, 8192, 4, 128, jnp.bfloat16), (8, 32768, 4, 128, jnp.bfloat16), (1, 8192, 1, 128, jnp.bfloat16),
        (8, 768, 4, 256, jnp.bfloat16), (8, 768, 4, 256, jnp.float16), (64, 8192, 4, 128, jnp.bfloat16)]
    if unpadded_ab:
        print("== unpadded decode rows (DECODE_UNPADDED_ROWS) off / on: time (full caches), bits (ragged)",
              flush=True)
    for b, s, kh, h, dt in unpadded_ab:
        q, kc, vc, full, mb = case(b, s, kh, h, dt)
        ragged = case(b, s, kh, h, dt, ragged=True)[3]
        res = {flag: bits_and_time("DECODE_UNPADDED_ROWS", flag, q, kc, vc, ragged, full)
               for flag in (False, True)}
        (b_off, t_off), (b_on, t_on) = res[False], res[True]
        print(f"  {jnp.dtype(dt).name} B{b} cache{s} K{kh} H{h}: padded {t_off*1e3:.1f} us "
              f"({pct(mb, t_off):.1f}%) unpadded {t_on*1e3:.1f} us ({pct(mb, t_on):.1f}%) "
              f"{t_off / t_on:.3f}x, ragged-length bits same={bool(np.array_equal(b_off, b_on))}", flush=True)

    if merge_only or "--merge-unroll" in argv:
        print("== merge kernel unroll (DECODE_MERGE_UNROLL) 1 / 4 / 8: time (full caches), bits vs 1 "
              "(ragged)", flush=True)
        for b, s, kh, h, dt in [(8, 8192, 4, 128, jnp.bfloat16), (1, 32768, 1, 128, jnp.bfloat16),
                                (1, 8192, 1, 128, jnp.bfloat16), (8, 32768, 4, 128, jnp.bfloat16),
                                (64, 8192, 4, 128, jnp.bfloat16), (8, 8192, 4, 256, jnp.bfloat16),
                                (8, 5000, 4, 256, jnp.float16), (2, 3000, 2, 128, jnp.float32)]:
            q, kc, vc, full, mb = case(b, s, kh, h, dt)
            ragged = case(b, s, kh, h, dt, ragged=True)[3]
            sweep_line(f"  {jnp.dtype(dt).name} B{b} cache{s} K{kh} H{h}:", "DECODE_MERGE_UNROLL",
                       (1, 4, 8), q, kc, vc, ragged, full, lambda t, mb=mb: pct(mb, t))

    if "--value-splits" not in argv:
        return
    print("== value splits (bit-neutral) at 1x / 2x / 4x DECODE_TARGET_PROGRAMS: time, bits vs 1x",
          flush=True)
    base = _k.DECODE_TARGET_PROGRAMS
    for shape in [(8, 8192, 4, 128), (8, 32768, 4, 128), (1, 32768, 4, 128), (1, 8192, 1, 128),
                  (8, 8192, 4, 256)]:
        q, kc, vc, full, mb = case(*shape)
        sweep_line(f"  B{shape[0]} cache{shape[1]} K{shape[2]} H{shape[3]}:", "DECODE_TARGET_PROGRAMS",
                   (base, 2 * base, 4 * base), q, kc, vc, full, full, lambda t, mb=mb: pct(mb, t))


if __name__ == "__main__":
    main(sys.argv[1:])
