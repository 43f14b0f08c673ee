"""Bitwise checks of detjax.parallel (DP, TP, DP x TP, gradients, generation) on several devices.

``tpgrad``: TP training (``tp_value_and_grad`` / ``tp_train_step``) on a one-layer tiny model:
loss, gradients and the SGD-updated parameters vs ``dp_train_step`` on one device, at every TP
degree (and DP 2 x TP 4 without ``--quick``); ``neg`` adds Megatron-psum gradient controls.

CPU: run as is; it forces 8 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set here before jax starts unless XLA_FLAGS already names a device count). GPU: uses the visible
GPUs (degrees above the device count are skipped). TP models are built with
``allow_xla_autotuning=True``, so that a GPU run without ``--autotune-off`` shows the
process-dependent bits instead of stopping at ``tensor_parallel``'s check.

    PYTHONPATH=. python scripts/multidevice_check.py [--json] [--only dp,tp,grad,tpgrad,gen,neg]
        [--autotune-off]
    PYTHONPATH=. python scripts/multidevice_check.py --bench [--bench-size medium] [--only none]

Prints a table (check, degree, bitwise equal, max |diff|, seconds); ``--json`` adds one JSON line
at the end (``{"devices": .., "backend": .., "rows": [...], "bench": [...]}``) for tests/CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# --autotune-off: XLA:GPU's fusion autotuner picks native or Triton block-level code per fusion by
# timing; on two H200s tensor-parallel bits varied between processes with it on and matched with it
# off (README, "Several devices"; detjax.parallel.tensor_parallel requires it on GPUs).
if "--autotune-off" in sys.argv and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
# Pallas registers a config flag when it first imports its fuser, in the middle of the first
# trace, which changes every later jit cache key: importing it first lets TP degree 1 reuse the
# single-device program compiled just before (tp_value_and_grad runs dp_value_and_grad's jit).
import jax.experimental.pallas.fuser  # noqa: E402,F401
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import detjax  # noqa: E402
from detjax import ops, parallel as par  # noqa: E402
from detjax.models.gemma import GemmaConfig, Transformer  # noqa: E402

ROWS = []


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def compare(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, float("inf")
    eq = bool(np.array_equal(bits(a), bits(b)))
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return eq, d


def tree_compare(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return False, float("inf")
    res = [compare(x, y) for x, y in zip(la, lb)]
    return all(r[0] for r in res), max(r[1] for r in res)


def record(check, degree, equal, maxdiff, secs, expect=True, note=""):
    ROWS.append(dict(check=check, degree=degree, equal=bool(equal), max_diff=maxdiff,
                     seconds=round(secs, 2), expect_equal=expect, ok=bool(equal) == expect,
                     note=note))
    print(f"{check:<28} {degree:<8} {'==' if equal else '!='}  max|d|={maxdiff:<10.3g} "
          f"{secs:6.1f}s  {'ok' if bool(equal) == expect else 'FAIL'} {note}", flush=True)


QUICK = False   # --quick: a subset of the degrees (the pytest run; compile time dominates)


def degrees(n, quick_subset=None):
    ds = [d for d in (1, 2, 4, 8) if d <= n]
    if QUICK and quick_subset is not None:
        ds = [d for d in ds if d in quick_subset or d == max(ds)]
    return ds


def test_config():
    # tiny, with 8 query heads / 2 KV heads so TP 8 divides the heads (KV heads are repeated)
    return GemmaConfig.tiny(num_heads=8, num_kv_heads=2)


def single_forward(model, toks, lengths=None):
    if lengths is None:
        return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(toks)))
    return np.asarray(nnx.jit(lambda m, t, l: m(t, l))(model, jnp.asarray(toks),
                                                       jnp.asarray(lengths)))


def check_forward(model, n, which):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, model.config.vocab_size, (8, 12)).astype(np.int32)
    lengths = np.asarray([12, 3, 7, 12, 1, 9, 5, 11], np.int32)
    ref = single_forward(model, toks)
    ref_len = single_forward(model, toks, lengths)
    meshes = []
    if "dp" in which:
        meshes += [("dp_forward", d, par.make_mesh(d, 1)) for d in degrees(n, (2,))]
    if "tp" in which:
        meshes += [("tp_forward", t, par.make_mesh(1, t)) for t in degrees(n)]
        if n >= 8:
            meshes += [("dp2xtp4_forward", "2x4", par.make_mesh(2, 4))]
    for name, deg, mesh in meshes:
        t0 = time.time()
        pm = par.tensor_parallel(model, mesh, allow_xla_autotuning=True)
        out = par.forward(pm, toks)
        eq, d = compare(out, ref)
        note = ""
        if name.startswith("tp") or name.startswith("dp2"):
            hlo = par._forward_jit.lower(pm, par.shard_batch(mesh, jnp.asarray(toks))) \
                .compile().as_text()
            bad = par.float_allreduces(hlo)
            note = f"float all-reduces: {len(bad)}"
            eq = eq and not bad
        record(name, deg, eq, d, time.time() - t0, note=note)
        ragged = (deg == 8 and name == "dp_forward") or deg == "2x4"
        if ragged or (not QUICK and name == "tp_forward"):
            t0 = time.time()
            out = par.forward(pm, toks, lengths)
            eq, d = compare(out, ref_len)
            record(name + "_ragged", deg, eq, d, time.time() - t0)


def check_grad(model, n):
    rng = np.random.default_rng(1)
    toks = rng.integers(0, model.config.vocab_size, (8, 6)).astype(np.int32)
    ref = None
    for d in degrees(n, (1,)):
        t0 = time.time()
        mesh = par.make_mesh(d, 1)
        loss, g = par.dp_value_and_grad(model, toks, mesh)
        loss, g = np.asarray(loss), jax.tree.map(np.asarray, g)
        if ref is None:
            ref = (loss, g)
            loss2, g2 = par.dp_value_and_grad(model, toks, mesh)
            eq, md = tree_compare((loss2, g2), ref)
            record("grad_run_to_run", d, eq, md, time.time() - t0)
            continue
        eq, md = tree_compare((loss, g), ref)
        record("grad_dp_vs_single", d, eq, md, time.time() - t0)


def tp_grad_config():
    # one (sliding-window) layer: every TP code path once, at half the compile time of two
    return test_config().replace(num_layers=1)


def check_tp_grad(n):
    """TP (and DP x TP) training: loss, gradients and one SGD step bitwise equal to one device."""
    model = Transformer(tp_grad_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    toks = rng.integers(0, model.config.vocab_size, (4, 10)).astype(np.int32)
    toks[0, 5] = toks[1, 7] = toks[0, 1]     # repeated tokens: the embedding scatter-add sums
    bs, lr = 2, 0.05
    t0 = time.time()
    mesh1 = par.make_mesh(1, 1)
    ref_loss, ref_g, ref_new = par.dp_train_step(model, toks, mesh1, lr=lr, block_size=bs)
    ref = (np.asarray(ref_loss), jax.tree.map(np.asarray, ref_g))
    ref_new = jax.tree.map(np.asarray, nnx.state(ref_new, nnx.Param))
    moved = any(not compare(a, b)[0] for a, b in zip(jax.tree.leaves(ref_new),
                                                      jax.tree.leaves(nnx.state(model, nnx.Param))))
    print(f"  (single-device reference: {time.time() - t0:.1f}s, SGD moved the parameters: "
          f"{moved})", flush=True)
    setups = [("tp_grad", t, par.make_mesh(1, t)) for t in degrees(n)]
    if n >= 8 and not QUICK:
        setups.append(("dp2xtp4_grad", "2x4", par.make_mesh(2, 4)))
    for name, deg, mesh in setups:
        t0 = time.time()
        pm = par.tensor_parallel(model, mesh, allow_xla_autotuning=True)
        last = deg == max(degrees(n))
        if last:   # the largest degree through tp_train_step: gradients and the updated parameters
            loss, g, new_pm = par.tp_train_step(pm, toks, lr=lr, block_size=bs)
        else:
            loss, g = par.tp_value_and_grad(pm, toks, block_size=bs)
        eq, md = tree_compare((np.asarray(loss), jax.tree.map(np.asarray, g)), ref)
        note = ""
        if pm.tp > 1:
            bad = par.float_allreduces(par.tp_grad_hlo(pm, toks, block_size=bs))
            note = f"float all-reduces: {len(bad)}"
            eq = eq and not bad
        record(name, deg, eq, md, time.time() - t0, note=note)
        if last:
            t0 = time.time()
            new = jax.tree.map(np.asarray, nnx.state(par.unshard(new_pm), nnx.Param))
            eq, md = tree_compare(new, ref_new)
            record("tp_train_step", deg, eq and moved, md, time.time() - t0,
                   note="updated parameters vs dp_train_step on one device")
            t0 = time.time()
            again = par.tp_value_and_grad(pm, toks, block_size=bs)
            eq, md = tree_compare((np.asarray(again[0]), jax.tree.map(np.asarray, again[1])), ref)
            record("tp_grad_run_to_run", deg, eq, md, time.time() - t0)
    if not QUICK and n >= 2:
        # the whole TP training with Megatron's backward (psum of the input-gradient partials)
        t0 = time.time()
        pm = par.tensor_parallel(model, par.make_mesh(1, 2), allow_xla_autotuning=True)
        loss, g = par.tp_value_and_grad(pm, toks, block_size=bs, grad_reduce="psum")
        eq, md = tree_compare((np.asarray(loss), jax.tree.map(np.asarray, g)), ref)
        bad = par.float_allreduces(par.tp_grad_hlo(pm, toks, block_size=bs, grad_reduce="psum"))
        record("neg_psum_tp_grad", 2, eq, md, time.time() - t0, expect=False,
               note=f"float all-reduces: {len(bad)} (psum TP backward must differ)")


def check_negative_grad(n):
    """Plain autodiff of a tensor-parallel projection inserts a float psum (Megatron's backward):
    it must show in the HLO and move the bits of the input gradient."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 1024)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((16, 1024)), jnp.float32)
    ref = jax.jit(lambda x, w, c: jax.vjp(lambda x_: ops.matmul(x_, w), x)[1](c)[0])(x, w, c)
    for t in [d for d in degrees(n) if d > 1]:     # < 1 s each: every degree, also in --quick
        t0 = time.time()
        mesh = par.make_mesh(1, t)
        colpar = jax.shard_map(ops.matmul, mesh=mesh, in_specs=(P(), P(None, par.MODEL)),
                               out_specs=P(None, par.MODEL), check_vma=False)
        f = jax.jit(lambda x, w, c: jax.vjp(lambda x_: colpar(x_, w), x)[1](c)[0])
        out = f(x, w, c)
        bad = par.float_allreduces(f.lower(x, w, c).compile().as_text())
        eq, d = compare(out, ref)
        record("neg_autodiff_tp_grad_mm", t, eq, d, time.time() - t0, expect=False,
               note=f"float all-reduces: {len(bad)}")


def check_generate(model, n):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3], [200, 100, 50]]
    kw_list = [("greedy", dict()), ("sampled", dict(temperature=0.8, top_k=20, top_p=0.9, seed=3))]
    for tag, kw in kw_list:
        ref = detjax.generate(model, prompts, max_new_tokens=6, **kw)
        setups = []
        setups += [(f"gen_{tag}_dp", d, par.make_mesh(d, 1)) for d in degrees(n) if d > 1]
        setups += [(f"gen_{tag}_tp", t, par.make_mesh(1, t)) for t in degrees(n) if t > 1]
        if QUICK:   # one DP and one TP degree per mode (the other extreme for sampling)
            big = max(degrees(n))
            keep = {"greedy": {("dp", big), ("tp", min(2, n))},
                    "sampled": {("dp", min(2, n)), ("tp", big)}}[tag]
            setups = [s for s in setups if (s[0][-2:], s[1]) in keep]
        for name, deg, mesh in setups:
            t0 = time.time()
            out = par.generate(par.tensor_parallel(model, mesh, allow_xla_autotuning=True), prompts, 6, **kw)
            eq = len(out) == len(ref) and all(
                compare(a, b)[0] for a, b in zip(out.tokens + out.logprobs,
                                                 ref.tokens + ref.logprobs))
            md = max((compare(a, b)[1] for a, b in zip(out.logprobs, ref.logprobs)
                      if a.shape == b.shape), default=0.0)
            record(name, deg, eq, md, time.time() - t0)


def check_negative(model, n):
    """psum (split-K) tensor parallelism must be caught: by the HLO check, and (when the bits
    move) by comparison with the single device."""
    rng = np.random.default_rng(2)
    for t in [d for d in degrees(n) if d > 1]:
        mesh = par.make_mesh(1, t)
        t0 = time.time()
        x = jnp.asarray(rng.standard_normal((16, 1024)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((1024, 128)), jnp.float32)
        ref = jax.jit(ops.matmul)(x, w)

        def rowpar(xl, wl):
            return jax.lax.psum(ops.matmul(xl, wl), par.MODEL)

        f = jax.jit(jax.shard_map(rowpar, mesh=mesh, in_specs=(P(None, par.MODEL),
                                                               P(par.MODEL, None)),
                                  out_specs=P(), check_vma=False))
        out = f(x, w)
        bad = par.float_allreduces(f.lower(x, w).compile().as_text())
        eq, d = compare(out, ref)
        record("neg_psum_rowparallel_mm", t, eq, d, time.time() - t0, expect=False,
               note=f"float all-reduces: {len(bad)}")
        if t == max(degrees(n)):
            t0 = time.time()
            toks = rng.integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
            pm = par.tensor_parallel(model, mesh, mode="psum", allow_xla_autotuning=True)
            out = par.forward(pm, toks)
            hlo = par._forward_jit.lower(pm, par.shard_batch(mesh, jnp.asarray(toks))) \
                .compile().as_text()
            bad = par.float_allreduces(hlo)
            eq, d = compare(out, single_forward(model, toks))
            record("neg_psum_tp_forward", t, eq, d, time.time() - t0, expect=False,
                   note=f"float all-reduces: {len(bad)} (psum TP must differ)")


# ---------------------------------------------------------------------------------------------

BENCH_SIZES = {
    "tiny": dict(cfg=dict(num_heads=8, num_kv_heads=2), batch=4, seq=16),
    # ~0.5B-parameter shape, large enough for a 2-GPU timing (bf16)
    "medium": dict(cfg=dict(vocab_size=32768, d_model=2048, num_layers=4, num_heads=16,
                            num_kv_heads=8, head_dim=128, hidden_dim=8192,
                            sliding_window=None, attention_pattern=("global",),
                            dtype="bfloat16", param_dtype="bfloat16"),
                   batch=8, seq=512),
}


def _time(fn, reps):
    out = fn()
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return out, float(np.median(ts))


def bench(n, size, reps):
    spec = BENCH_SIZES[size]
    cfg = GemmaConfig(**spec["cfg"])
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (spec["batch"], spec["seq"])).astype(np.int32)
    rows = []
    tp = max(d for d in degrees(n) if cfg.num_heads % d == 0 and cfg.hidden_dim % d == 0)
    results = {}
    for impl in ("detjax", "xla"):
        model = Transformer(cfg, rngs=nnx.Rngs(0), impl=impl)
        for deg, mode in ((1, "gather"), (tp, "gather"), (tp, "psum")):
            if deg == 1 and mode == "psum":
                continue
            mesh = par.make_mesh(1, deg)
            pm = par.tensor_parallel(model, mesh, mode=mode, allow_xla_autotuning=True)
            xt = par.shard_batch(mesh, jnp.asarray(toks))
            out, t = _time(lambda: par._forward_jit(pm, xt), reps)
            results[(impl, deg, mode)] = np.asarray(out)
            hlo = par._forward_jit.lower(pm, xt).compile().as_text()
            eq = compare(results[(impl, deg, mode)], results[(impl, 1, "gather")])[0]
            rows.append(dict(impl=impl, tp=deg, mode=mode, ms=round(t * 1e3, 3),
                             float_allreduces=len(par.float_allreduces(hlo)),
                             bitwise_eq_tp1=bool(eq)))
            print(f"bench {impl:<7} TP={deg} {mode:<6} {t * 1e3:10.3f} ms  float all-reduces="
                  f"{rows[-1]['float_allreduces']:<3} bits==TP1: {eq}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON summary line at the end")
    ap.add_argument("--autotune-off", action="store_true",
                    help="run with XLA_FLAGS+=--xla_gpu_autotune_level=0 (set before jax starts)")
    ap.add_argument("--only", default="dp,tp,grad,tpgrad,gen,neg",
                    help="comma list of checks: dp,tp,grad,tpgrad,gen,neg ('none' for bench "
                         "only)")
    ap.add_argument("--bench", action="store_true", help="time TP=1 vs TP=n vs psum TP")
    ap.add_argument("--bench-size", default=None, choices=sorted(BENCH_SIZES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="fewer degrees per check (the test suite's run; ~4.5 min on 2 CPU cores)")
    a = ap.parse_args(argv)
    global QUICK
    QUICK = a.quick
    n = len(jax.devices())
    which = set(a.only.split(","))
    print(f"devices: {n} x {jax.devices()[0].device_kind} ({jax.default_backend()}), detjax "
          f"backend {detjax.chosen_backend()}, jax {jax.__version__}", flush=True)
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}", flush=True)
    print(f"{'check':<28} {'degree':<8} bits  {'max|diff|':<16} {'time':>7}", flush=True)
    model = Transformer(test_config(), rngs=nnx.Rngs(0))
    t_all = time.time()
    if which & {"dp", "tp"}:
        check_forward(model, n, which)
    if "grad" in which:
        check_grad(model, n)
    if "tpgrad" in which:
        check_tp_grad(n)
    if "gen" in which:
        check_generate(model, n)
    if "neg" in which:
        check_negative(model, n)
        check_negative_grad(n)
    bench_rows = []
    if a.bench:
        size = a.bench_size or ("medium" if jax.default_backend() == "gpu" else "tiny")
        bench_rows = bench(n, size, a.reps)
    ok = all(r["ok"] for r in ROWS)
    print(f"{'ALL OK' if ok else 'FAILURES'}: {sum(r['ok'] for r in ROWS)}/{len(ROWS)} rows, "
          f"{time.time() - t_all:.1f}s", flush=True)
    if a.json:
        print(json.dumps(dict(devices=n, backend=jax.default_backend(),
                              detjax_backend=detjax.chosen_backend(), rows=ROWS,
                              bench=bench_rows, ok=ok)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
