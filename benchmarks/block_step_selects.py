"""The selects of the attention block step: an A/B of ``_block_step`` with and without them.

``_block_step`` (``pallas_kernels/attention.py``) folds one 64-key block into the softmax state of
64 rows. It had two per-element selects that keep a row's state bitwise unchanged when the block
holds no valid key for it: ``acc = where(any_valid, acc_new, acc)`` over the ``[64, Hp]`` float32
accumulator, which keeps the old and the new accumulator alive together (at head dim 256 and
4 warps, 128 + 128 registers per thread), and ``p = where(valid, exp(s - m), 0)`` over the
``[64, 64]`` probabilities, although ``s`` is already ``-inf`` outside the interval. Neither changes
a finite result (``_block_step``'s docstring says why; CPU test
``test_block_step_selects_do_not_change_bits``, which runs compiled on a GPU too). This script
measures what they cost and checks the bits on the GPU at the benchmark shapes:

* variants: ``selects`` (both; the form of sessions 1-19), ``no acc select``, ``no selects`` (the
  default since run s20-1: ``BLOCK_STEP_SELECT_ACC`` / ``_P``);
* causal bf16 prefill through ``detjax.ops.attention`` (the product path: split-parallel at head
  dims 128/256, the one-kernel prefill at 64), N = 8, T = S, against cuDNN;
* one-token decode through ``decode_attention`` (full caches), against XLA, with the % of the
  copy bandwidth for the K/V bytes;
* bits: every variant's output against the ``selects`` output of the same inputs.

CUPTI device time (``bench_kernels.device_ms``: a compile call, a warm-up call, median of
``--iters``), random normal inputs, all in one process. GPU only for the timings; on CPU (interpret
mode) it runs the bit check at one small shape.

Run from the repo root: python benchmarks/block_step_selects.py [--iters N] [--quick]
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_attention import decode_case, xla_decode
from benchmarks.bench_kernels import bits, copy_bandwidth_gbs, device_ms, kernel_settings
from detjax.ops._attention import attention, decode_attention

VARIANTS = [("selects", True, True), ("no acc select", False, True), ("no selects", False, False)]
PREFILL = [(1, 2048, 128, 4), (8, 2048, 128, 4), (1, 8192, 128, 4), (8, 8192, 128, 4),
           (1, 2048, 256, 4), (8, 2048, 256, 4), (1, 8192, 256, 4), (8, 8192, 256, 4),
           (8, 2048, 64, 4)]
DECODE = [(8, 8192, 4, 128), (64, 8192, 4, 128), (8, 32768, 4, 128), (8, 8192, 4, 256),
          (1, 32768, 1, 128)]


def run_variants(f, args, iters, timed):
    """[(ms or None, output)] per variant; the kernels are retraced for each (cleared caches)."""
    out = []
    for _, acc, p in VARIANTS:
        with kernel_settings(BLOCK_STEP_SELECT_ACC=acc, BLOCK_STEP_SELECT_P=p):
            y = jax.block_until_ready(jax.jit(f)(*args))
            ms = device_ms(f, *args, iters=iters) if timed else None
        out.append((ms, y))
    return out


def same(res):
    return all(np.array_equal(bits(y), bits(res[0][1])) for _, y in res[1:])


def main(argv):
    iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
    gpu = jax.default_backend() == "gpu"
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    key = jax.random.key(11)
    if not gpu:
        q, k, v = (jax.random.normal(kk, (2, 1100, n, 64), jnp.bfloat16)
                   for kk, n in zip(jax.random.split(key, 3), (4, 2, 2)))
        res = run_variants(lambda q, k, v: attention(q, k, v, sliding_window=300), (q, k, v), 1, False)
        print(f"interpret: prefill T1100 window 300: {'same' if same(res) else 'DIFFER'}; no GPU: timings skipped")
        return 0 if same(res) else 1
    prefill, decode = (PREFILL[:2], DECODE[:1]) if "--quick" in argv else (PREFILL, DECODE)
    ok = True
    head = "".join(f" {n:>18s}" for n, _, _ in VARIANTS)
    print(f"== causal bf16 prefill, N = 8 (ms; ratio = cuDNN / this) ==\n{'shape':20s} {'cuDNN':>8s}{head} bits")
    for b, t, h, kh in prefill:
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * t + h + kh), 3)
        q = jax.random.normal(kq, (b, t, 8, h), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, kh, h), jnp.bfloat16)
        ref = device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=iters)
        res = run_variants(lambda q, k, v: attention(q, k, v), (q, k, v), iters, True)
        s = same(res)
        ok &= s
        print(f"B{b} T{t} H{h} K{kh}".ljust(20) + f" {ref:8.4f}"
              + "".join(f" {ms:8.4f} ({ref / ms:4.2f}x)" for ms, _ in res) + f" {'same' if s else 'DIFFER'}",
              flush=True)
    copy = copy_bandwidth_gbs(iters)
    print(f"== one-token decode, N = 8, full caches (us; ratio = XLA / this; % of copy {copy:.0f} GB/s) ==")
    print(f"{'shape':22s} {'XLA':>7s}" + "".join(f" {n:>22s}" for n, _, _ in VARIANTS) + " bits")
    for b, s_, kh, h in decode:
        q, kc, vc, lengths = decode_case(jax.random.fold_in(key, h), b, s_, kh, h)
        gb = (kc.nbytes + vc.nbytes) / 1e6
        ref = device_ms(xla_decode, q, kc, vc, lengths, iters=iters)
        res = run_variants(lambda q, kc, vc, l: decode_attention(q, kc, vc, l), (q, kc, vc, lengths),
                           iters, True)
        s = same(res)
        ok &= s
        print(f"B{b} cache{s_} K{kh} H{h}".ljust(22) + f" {ref * 1e3:7.1f}"
              + "".join(f" {ms * 1e3:7.1f} ({ref / ms:4.2f}x {100 * gb / ms / copy:3.0f}%)" for ms, _ in res)
              + f" {'same' if s else 'DIFFER'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
