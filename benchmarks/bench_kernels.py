"""Kernel benchmarks: detjax against XLA's default path, in the same run, device-side timing.

Usage: ``python benchmarks/bench_kernels.py [--quick] [--json OUT.json] [--only matmul,rows,attn]``

Timing: ``jax.experimental.mosaic.gpu.profiler.measure`` (CUPTI, device-side), after a warm-up
call, median of ``--iters`` runs. Inputs are random normal (never zeros). Decode-shape matmuls
rotate over several weight copies so the weights come from HBM, not the 50 MB L2.
Ratio = XLA time / detjax time (> 1: detjax faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detjax import ops  # noqa: E402

BF16_PEAK_TFLOPS = 798.0  # measured ceiling on the H100 (XLA 8192^3 bf16), see GPU_FACTS / results


def bits(x):
    """Bit patterns of a 2- or 4-byte array (for bitwise comparisons of outputs)."""
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@contextlib.contextmanager
def kernel_settings(**settings):
    """Set module-level switches of ``pallas_kernels.attention`` (e.g. ``DECODE_UNPADDED_ROWS=True``)
    for the ``with`` block, then restore them. jax's caches are cleared on both sides: the ops'
    inner ``jax.jit`` would otherwise reuse the trace of the first setting (a fresh outer function
    does not retrace it), and an A/B would time one form twice."""
    from pallas_kernels import attention as _k
    old = {name: getattr(_k, name) for name in settings}   # AttributeError for a misspelt switch
    for name, value in settings.items():
        setattr(_k, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(_k, name, value)
        jax.clear_caches()


def output_and_ms(f, args, settings, *, iters=10, timed=True, out_args=None):
    """``(output, ms or None)`` of ``f`` traced and compiled under ``kernel_settings(**settings)``:
    the output of ``f(*out_args)`` (default ``args``) and the device time of ``f(*args)``. The one
    step of every A/B of a bit-neutral switch (``attention_ab``, ``decode_breakdown``,
    ``prefill_split_parallel --configs``)."""
    with kernel_settings(**settings):
        out = jax.block_until_ready(jax.jit(f)(*(args if out_args is None else out_args)))
        return out, (device_ms(f, *args, iters=iters) if timed else None)


def device_ms(f, *args, iters=20):
    """Median device time (ms) of the jitted f(*args); falls back to host timing off-GPU."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))  # compile + warm-up
    jax.block_until_ready(f(*args))  # a first-ever trace can register config state and retrace once
    if jax.default_backend() == "gpu":
        from jax.experimental.mosaic.gpu import profiler
        _, times = profiler.measure(f, iterations=iters)(*args)
        return statistics.median(times)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def copy_bandwidth_gbs(iters):
    x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    ms = device_ms(lambda v: v * 1.0001, x, iters=iters)
    return 2 * x.nbytes / ms / 1e6


def bench_matmul(rows, iters, quick, sweep=None):
    key = jax.random.key(1)
    shapes = [("square 8192^3", 8192, 8192, 8192)]
    for m in ([1, 16, 128, 1024, 4096] if not quick else [1, 1024]):
        shapes.append((f"M={m} K=N=4096", m, 4096, 4096))
    if not quick:
        shapes += [("2B qkv-ish 4096x2304x2048", 4096, 2304, 2048),
                   ("2B up 4096x2304x9216", 4096, 2304, 9216),
                   ("2B down 4096x9216x2304", 4096, 9216, 2304),
                   ("2B unembed 8x2304x256000", 8, 2304, 256000),
                   ("2B up decode 8x2304x9216", 8, 2304, 9216),
                   ("2B down decode 8x9216x2304", 8, 9216, 2304)]
    for name, m, k, n in shapes:
        ka, kb = jax.random.split(jax.random.fold_in(key, m * 7 + n))
        a = jax.random.normal(ka, (m, k), jnp.bfloat16)
        weight_bytes = k * n * 2
        copies = max(1, min(8, int(np.ceil(150e6 / weight_bytes)))) if m <= 1024 else 1
        ws = jax.random.normal(kb, (copies, k, n), jnp.bfloat16)

        def xla(a, ws):
            return [jnp.dot(a, ws[i], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
                    for i in range(ws.shape[0])]

        def det(a, ws):
            return [ops.matmul(a, ws[i]) for i in range(ws.shape[0])]

        t_x = device_ms(xla, a, ws, iters=iters) / copies
        t_d = device_ms(det, a, ws, iters=iters) / copies
        if sweep is not None:
            from pallas_kernels import matmul as mm
            for cname, cfg in mm.GPU_CONFIGS.items():
                def det_cfg(a, ws, cfg=cfg):
                    return [mm.matmul_kernel_call(a[None], ws[i][None], config=cfg)
                            for i in range(ws.shape[0])]
                try:
                    t_c = device_ms(det_cfg, a, ws, iters=iters) / copies
                except Exception as e:  # e.g. shared memory exceeded: report, keep going
                    print(f"sweep {name} {cname}: failed ({type(e).__name__})")
                    continue
                sweep.append(dict(name=name, config=cname, ms=t_c, ratio=t_x / t_c,
                                  tflops=2 * m * k * n / t_c / 1e9))
                print(f"sweep {name:32s} {cname:12s} {t_c:8.4f} ms  ratio {t_x / t_c:5.2f}")
        flops = 2 * m * k * n
        bytes_ = 2 * (m * k + k * n + m * n)
        rows.append(dict(kind="matmul", name=name, xla_ms=t_x, detjax_ms=t_d, ratio=t_x / t_d,
                         tflops=flops / t_d / 1e9, gbs=bytes_ / t_d / 1e6,
                         bound="flops" if m >= 1024 else "bytes"))


def bench_rows(rows, iters, quick, copy_gbs):
    key = jax.random.key(2)
    for m in ([4096, 32768] if not quick else [32768]):
        x = jax.random.normal(key, (m, 4096), jnp.bfloat16)
        s = jax.random.normal(key, (4096,), jnp.bfloat16) * 0.1

        def rms_xla(x, s):
            xf = x.astype(jnp.float32)
            return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6) * (1 + s.astype(jnp.float32))).astype(x.dtype)

        cases = [("rms_norm", rms_xla, lambda x, s: ops.rms_norm(x, s), 2),
                 ("softmax", lambda x, s: jax.nn.softmax(x.astype(jnp.float32)).astype(x.dtype),
                  lambda x, s: ops.softmax(x), 2),
                 ("logsumexp", lambda x, s: jax.nn.logsumexp(x.astype(jnp.float32), -1).astype(x.dtype),
                  lambda x, s: ops.logsumexp(x), 1)]
        for name, fx, fd, passes in cases:
            t_x = device_ms(fx, x, s, iters=iters)
            t_d = device_ms(fd, x, s, iters=iters)
            bytes_ = x.nbytes * passes
            gbs = bytes_ / t_d / 1e6
            rows.append(dict(kind="rows", name=f"{name} [{m},4096] bf16", xla_ms=t_x, detjax_ms=t_d,
                             ratio=t_x / t_d, gbs=gbs, pct_ceiling=100 * gbs / copy_gbs, bound="bytes"))


def print_table(rows, copy_gbs):
    print(f"\ndevice: {jax.devices()[0].device_kind}  jax {jax.__version__}  "
          f"copy ceiling {copy_gbs:.0f} GB/s  bf16 ceiling {BF16_PEAK_TFLOPS} TFLOP/s")
    print(f"{'case':38s} {'XLA ms':>9s} {'detjax ms':>10s} {'ratio':>6s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%ceil':>6s}")
    for r in rows:
        tf = r.get("tflops")
        pct = (100 * tf / BF16_PEAK_TFLOPS) if (tf and r["bound"] == "flops") else \
            100 * r["gbs"] / copy_gbs
        print(f"{r['name']:38s} {r['xla_ms']:9.4f} {r['detjax_ms']:10.4f} {r['ratio']:6.2f} "
              f"{(tf or 0):8.1f} {r['gbs']:7.0f} {pct:6.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--only", default="matmul,rows")
    p.add_argument("--sweep", action="store_true", help="time every GPU matmul tile config too")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    copy_gbs = copy_bandwidth_gbs(args.iters)
    rows = []
    sweep = [] if args.sweep else None
    if "matmul" in only:
        bench_matmul(rows, args.iters, args.quick, sweep)
    if "rows" in only:
        bench_rows(rows, args.iters, args.quick, copy_gbs)
    if "attn" in only:
        from benchmarks import bench_attention  # noqa: F401  (added with the attention kernels)
        bench_attention.run(rows, args.iters, args.quick, copy_gbs, device_ms)
    print_table(rows, copy_gbs)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                                   jax=jax.__version__, copy_gbs=copy_gbs,
                                                   rows=rows, sweep=sweep), indent=1))
    return rows


if __name__ == "__main__":
    main()
