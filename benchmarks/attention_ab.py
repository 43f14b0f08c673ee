"""A/B driver for the attention kernels' bit-neutral switches: times and bits of each variant.

A *switch* is a module-level setting of ``pallas_kernels.attention`` read at trace time (e.g.
``BLOCK_STEP_SELECT_P``, ``DECODE_MERGE_UNROLL``); a *variant* is a name and the settings it takes
(``bench_kernels.output_and_ms``: ``kernel_settings`` clears jax's caches, so every variant is
traced anew).
For each shape the driver times every variant and compares its output bits with the first
variant's (the reference form):

* causal bf16 prefill through ``detjax.ops.attention`` (the product path), N = 8, T = S, against
  cuDNN (shapes with options, e.g. a soft cap, are timed without cuDNN, which has none);
* one-token decode through ``decode_attention`` (full caches), against XLA, with the % of the copy
  bandwidth for the K/V bytes.

CUPTI device time (``bench_kernels.device_ms``: a compile call, a warm-up call, median of
``iters``), random normal inputs, one process. Off the GPU (interpret mode) ``main`` runs the bit
check of ``cpu_case`` only. Used by ``benchmarks/block_step_selects.py``; session 22's
``INTERIOR_BLOCKS`` A/B (``benchmarks/interior_mask.py`` at commit 3aea547, run s22-1 in
``results/README.md``) ran through it too.
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import decode_case, xla_decode
from benchmarks.bench_kernels import bits, copy_bandwidth_gbs, device_ms, output_and_ms
from detjax.ops._attention import attention, decode_attention


def run_variants(f, args, variants, iters, timed):
    """[(ms or None, output)] per variant ``(name, settings)``."""
    return [output_and_ms(f, args, settings, iters=iters, timed=timed)[::-1] for _, settings in variants]


def same(res):
    return all(np.array_equal(bits(y), bits(res[0][1])) for _, y in res[1:])


def _shape(entry):
    """``(b, t_or_s, x, y)`` or the same plus an options dict."""
    return (*entry[:4], entry[4] if len(entry) > 4 else {})


def main(argv, variants, prefill, decode, cpu_case):
    """``prefill``: ``(b, t, head_dim, kv_heads[, attention options])``; ``decode``: ``(b, cache,
    kv_heads, head_dim[, decode options])``; ``cpu_case``: ``(name, f, args)`` for interpret mode.
    ``--iters N`` (default 10), ``--quick`` (the first two prefill and the first decode shape).
    Returns 0 if every variant gave the reference bits everywhere, else 1."""
    iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("variants: " + "; ".join(f"{n} = {s}" for n, s in variants))
    key = jax.random.key(11)
    if jax.default_backend() != "gpu":
        name, f, args = cpu_case
        ok = same(run_variants(f, args, variants, 1, False))
        print(f"interpret: {name}: {'same' if ok else 'DIFFER'}; no GPU: timings skipped")
        return 0 if ok else 1
    if "--quick" in argv:
        prefill, decode = prefill[:2], decode[:1]
    ok = True
    head = "".join(f" {n:>18s}" for n, _ in variants)
    print(f"== causal bf16 prefill, N = 8 (ms; ratio = cuDNN / this) ==\n{'shape':34s} {'cuDNN':>8s}{head} bits")
    for entry in prefill:
        b, t, h, kh, opts = _shape(entry)
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * t + h + kh), 3)
        q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
        ref = None if opts else device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=iters)
        res = run_variants(lambda q, k, v: attention(q, k, v, **opts), (q, k, v), variants, iters, True)
        s = same(res)
        ok &= s
        label = f"B{b} T{t} H{h} K{kh}" + "".join(f" {k_}={v_}" for k_, v_ in opts.items())
        print(label.ljust(34) + (f" {ref:8.4f}" if ref else f" {'-':>8s}")
              + "".join(f" {ms:8.4f} ({ref / ms:4.2f}x)" if ref else f" {ms:8.4f}        " for ms, _ in res)
              + f" {'same' if s else 'DIFFER'}", flush=True)
    copy = copy_bandwidth_gbs(iters)
    print(f"== one-token decode, N = 8, full caches (us; ratio = XLA / this; % of copy {copy:.0f} GB/s) ==")
    print(f"{'shape':34s} {'XLA':>7s}" + "".join(f" {n:>22s}" for n, _ in variants) + " bits")
    for entry in decode:
        b, s_, kh, h, opts = _shape(entry)
        q, kc, vc, lengths = decode_case(jax.random.fold_in(key, h), b, s_, kh, h)
        gb = (kc.nbytes + vc.nbytes) / 1e6
        ref = device_ms(xla_decode, q, kc, vc, lengths, iters=iters)
        res = run_variants(lambda q, kc, vc, l: decode_attention(q, kc, vc, l, **opts),
                           (q, kc, vc, lengths), variants, iters, True)
        s = same(res)
        ok &= s
        label = f"B{b} cache{s_} K{kh} H{h}" + "".join(f" {k_}={v_}" for k_, v_ in opts.items())
        print(label.ljust(34) + f" {ref * 1e3:7.1f}"
              + "".join(f" {ms * 1e3:7.1f} ({ref / ms:4.2f}x {100 * gb / ms / copy:3.0f}%)" for ms, _ in res)
              + f" {'same' if s else 'DIFFER'}", flush=True)
    return 0 if ok else 1
