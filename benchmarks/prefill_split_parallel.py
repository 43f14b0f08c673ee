"""Prefill through the split-parallel (decode) kernels: an A/B against the one-kernel prefill.

The default prefill kernel (``attention_fwd_call``) walks a q block's splits in one program and
keeps two float32 states in registers: the split's ``[64, Hp]`` accumulator and the running
total's. At head dim 256 that is 256 registers per thread for the two accumulators alone (4 warps),
so the kernel spills. ``decode_call`` computes the same split states in one program per
(q block, split), writes them to HBM and merges them in ascending order in a second kernel with the
same ``_merge_states`` / ``_finalize`` code: the decode = prefill guarantee (tested on CPU and the
GPU since session 2) says its output is bitwise the prefill kernel's for the same rows. So prefill
may run through it without changing a bit, trading register pressure for the state traffic
(``ns * Rp * Hp * 4`` bytes written and read back per (batch, KV head)).

This script measures that trade (causal bf16 prefill, N = 8): the one-kernel prefill with its
configuration and with 8 warps, the split-parallel path as ``prefill_call`` runs it (with the
``lse``, storing and merging only the splits a q block touches, in row groups whose states fit
``PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES``), the same in one call whatever the states' size
(session 19's run s19-1 measured this form), the same kernels as decode runs them (no ``lse``, every split
stored and merged), and cuDNN, in the same process (CUPTI
device time: a compile call, a warm-up call, median of ``--iters``; both prefill paths return
the output and the ``lse`` the backward pass needs), and checks that the split-parallel output and
``lse`` are bitwise the prefill kernel's (also with a window, soft cap, ragged lengths
and f16). GPU for the timings; on CPU it runs the bit checks at small shapes in interpret mode.

Run from the repo root: python benchmarks/prefill_split_parallel.py [--iters N] [--quick | --lean | --h64
| --configs] (``--quick``: the four head-dim-128 shapes; ``--lean``: the T = 8192 shapes and B8
T2048 H256, the one-kernel and the split-parallel prefill only; ``--h64``: the same two columns at
the head-dim-64 shapes; ``--configs``: the split-parallel prefill at the ``--lean`` shapes
under other (warps, stages) of its kernels, ``CONFIGS``, with the bits against the default's.)
"""
import sys

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import bits, device_ms, output_and_ms
from pallas_kernels import attention as _k

SHAPES = [  # (B, T, H, K); N = 8, causal, T = S
    (1, 2048, 128, 4), (8, 2048, 128, 4), (1, 8192, 128, 4), (8, 8192, 128, 4),
    (1, 2048, 256, 4), (8, 2048, 256, 4), (1, 8192, 256, 4), (8, 8192, 256, 4),
    # head dim 64 keeps the one-kernel prefill (not in PREFILL_SPLIT_PARALLEL_HEAD_DIMS): not yet timed
    (8, 2048, 64, 4), (1, 8192, 64, 4),
]


#: ``--lean`` and ``--configs``: the T = 8192 shapes at head dims 128/256 and B8 T2048 H256.
LEAN_SHAPES = [x for x in SHAPES if x[1] == 8192 and x[2] > 64] + [(8, 2048, 256, 4)]

#: ``--configs``: (num_warps, num_stages) of the split and merge kernels tried per head dim; the first
#: is ``gpu_config``'s default for bf16. Warps >= 4 and the stages were measured bit-neutral for the
#: decode kernels (``gpu_config``); the sweep checks the bits again.
CONFIGS = {128: [(4, 2), (4, 3), (8, 2)], 256: [(8, 2), (4, 2), (8, 3)]}


def decode_config(config):
    """``gpu_config`` with the decode (split and merge) kernels' (warps, stages) replaced by
    ``config`` (for ``output_and_ms(..., {"gpu_config": ...})``)."""
    base = _k.gpu_config

    def patched(hp, kernel="prefill", dtype=None):
        return config if kernel == "decode" else base(hp, kernel, dtype)
    return patched


def config_sweep(iters):
    """The ``--configs`` table: split-parallel prefill time per (warps, stages), and its bits."""
    ok = True
    print("== split-parallel prefill, causal bf16, N = 8: (warps, stages) of its kernels "
          "(ms; ratio = cuDNN / this) ==")
    for b, t, h, kh in LEAN_SHAPES:
        (q, k, v), prep, cfg = operands(jax.random.key(1), b, t, h, kh)
        t_cudnn = device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=iters)
        cells, ref = [], None
        for config in CONFIGS[h]:
            try:
                out, ms = output_and_ms(split_parallel(cfg), prep, {"gpu_config": decode_config(config)},
                                        iters=iters)
            except Exception as e:  # a configuration may not compile (shared memory): report, go on
                cells.append(f"{config}: {type(e).__name__}")
                continue
            if ref is None:
                ref = out
            same = all(np.array_equal(bits(x), bits(y)) for x, y in zip(out, ref))
            ok &= same
            cells.append(f"{config}: {ms:.4f} ({t_cudnn / ms:4.2f}x){'' if same else ' DIFFER'}")
        print(f"B{b} T{t} H{h} K{kh} cuDNN {t_cudnn:.4f}: " + "; ".join(cells), flush=True)
    return ok


def operands(key, b, t, h, kh, dtype=jnp.bfloat16, n=8, lengths=None, window=None, cap=None):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, n, h), dtype)
    k = jax.random.normal(kk, (b, t, kh, h), dtype)
    v = jax.random.normal(kv, (b, t, kh, h), dtype)
    lens = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    pos = _k.default_q_positions(b, t, t)
    cfg = _k.AttnConfig(scale=h ** -0.5, soft_cap=cap, backend="auto")
    prep = _k.prepare(q, k, v, pos, lens, causal=True, sliding_window=window)
    return (q, k, v), prep, cfg


def one_kernel(cfg, config=None):
    """``(o, lse)`` of the one-kernel prefill."""
    return lambda *p: _k.attention_fwd_call(*p, cfg, config=config)


def split_parallel(cfg):
    """``(o, lse)`` of the split-parallel prefill as ``prefill_call`` runs it (row groups whose
    states fit ``PREFILL_SPLIT_PARALLEL_MAX_STATE_BYTES``)."""
    return lambda *p: _k.split_parallel_prefill(*p, cfg)


def split_parallel_one_call(cfg):
    """The same in one ``decode_call`` whatever the states' size (session 19's first form)."""
    return lambda *p: _k.decode_call(*p, cfg, with_lse=True)


def same_bits(cfg, prep):
    """Output and lse bitwise equal."""
    a = jax.jit(one_kernel(cfg))(*prep)
    b = jax.jit(split_parallel(cfg))(*prep)
    return all(np.array_equal(bits(x), bits(y)) for x, y in zip(a, b))


def bit_checks(small):
    """(name, same) for masked / ragged / f16 cases."""
    t = 1100 if small else 3000   # two and three splits, the last one partial
    out = []
    for dtype, h in ((jnp.bfloat16, 128), (jnp.float16, 256), (jnp.bfloat16, 256)):
        for name, kw in (("causal", {}),
                         ("window 700 cap 30 ragged", dict(window=700, cap=30.0,
                                                           lengths=[t, t - 333]))):
            _, prep, cfg = operands(jax.random.key(7), 2, t, h, 2, dtype, n=4, **kw)
            out.append((f"{jnp.dtype(dtype).name} H{h} T{t} {name}", same_bits(cfg, prep)))
        if small:
            break
    return out


def main(argv):
    iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
    gpu = jax.default_backend() == "gpu"
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if "--configs" in argv and gpu:   # the sweep checks its own bits (against the default config)
        return 0 if config_sweep(iters) else 1
    print("== bits: split-parallel = one-kernel prefill (output and lse) ==")
    checks = bit_checks(small=not gpu)
    for name, same in checks:
        print(f"  {name:44s} {'same' if same else 'DIFFER'}")
    if not gpu:
        print("no GPU: timings skipped")
        return 0 if all(s for _, s in checks) else 1
    h64 = "--h64" in argv     # the head-dim-64 shapes alone; one-kernel vs split-parallel
    lean = "--lean" in argv or h64   # the T = 8192 shapes and B8 T2048 H256; one-kernel vs split-par
    shapes = SHAPES[:4] if "--quick" in argv else SHAPES
    if h64:
        shapes = [x for x in SHAPES if x[2] == 64]
    elif lean:
        shapes = LEAN_SHAPES
    print("== causal bf16 prefill, N = 8 (ms; ratio = cuDNN / this) ==")
    cols = (["1-kernel", "split-par"] if lean else
            ["1-kernel", "1-kernel 8w", "split-par", "one call", "all splits"])
    print(f"{'shape':22s} {'cuDNN':>8s}" + "".join(f" {c:>16s}" for c in cols) + " bits")
    ok = all(s for _, s in checks)
    for b, t, h, kh in shapes:
        (q, k, v), prep, cfg = operands(jax.random.key(1), b, t, h, kh)
        t_cudnn = device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=iters)
        row = [t_cudnn]
        variants = [one_kernel(cfg), one_kernel(cfg, config=(8, 1)), split_parallel(cfg),
                    split_parallel_one_call(cfg), lambda *p: _k.decode_call(*p, cfg)]
        for f in ([variants[0], variants[2]] if lean else variants):
            try:
                row.append(device_ms(f, *prep, iters=iters))
            except Exception as e:  # a configuration may not compile: report, go on
                print(f"  ({type(e).__name__}: {str(e)[:120]})")
                row.append(float("nan"))
        same = same_bits(cfg, prep)
        ok &= same
        cells = "".join(f" {x:8.4f} ({t_cudnn / x:4.2f}x)" for x in row[1:])
        print(f"B{b} T{t} H{h} K{kh}".ljust(22) + f" {t_cudnn:8.4f}" + cells + f" {'same' if same else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
