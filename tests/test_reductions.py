"""Row reductions: sum, mean, max/min, argmax/argmin, logsumexp, softmax, log_softmax, rms_norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import (DTYPE_IDS, DTYPES, ON_GPU, assert_bitwise_equal, bitwise_equal, randn,
                      rel_err)
from detjax import ops
from pallas_kernels import reductions as red

N = 1500  # two 1024-lane chunks, the second partial


def rms_ref(x, s, eps=1e-6, offset=1.0):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * (offset + s.astype(jnp.float32))


OPS = {
    "sum": (ops.sum, lambda x: np.sum(x, -1)),
    "mean": (ops.mean, lambda x: np.mean(x, -1)),
    "max": (ops.max, lambda x: np.max(x, -1)),
    "logsumexp": (ops.logsumexp, lambda x: np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)),
    "softmax": (ops.softmax, lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)),
    "log_softmax": (ops.log_softmax, lambda x: (x - x.max(-1, keepdims=True)) - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True))),
}
TOL = {jnp.dtype(jnp.bfloat16): 8e-3, jnp.dtype(jnp.float16): 1.5e-3, jnp.dtype(jnp.float32): 1e-5}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_vmap_run_to_run_and_accuracy(rng, name, dtype):
    f, ref = OPS[name]
    x = randn(rng, (33, N), dtype, 2.0)
    full = f(x)
    # One row per program (grid = rows, pallas_kernels/_rows.py), so a prefix only changes the
    # grid's length: 1 and 7 rows (with row 20 alone and the 33 of the batch) cover it.
    for m in (1, 7):
        assert_bitwise_equal(f(x[:m]), full[:m], f"{name} prefix {m}")
    assert_bitwise_equal(f(x[20:21])[0], full[20], f"{name} row 20")
    assert_bitwise_equal(jax.vmap(f)(x)[5], f(x[5]), f"{name} vmap")
    assert_bitwise_equal(jax.jit(f)(x), jax.jit(f)(x), f"{name} run-to-run")
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    assert rel_err(full, ref(x64)) < TOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_invariance_and_accuracy(rng, dtype):
    x, s = randn(rng, (3, 11, 700), dtype), randn(rng, (700,), dtype, 0.1)
    out = ops.rms_norm(x, s)
    assert out.dtype == jnp.dtype(dtype)
    assert_bitwise_equal(ops.rms_norm(x[1:2, 4:5], s)[0, 0], out[1, 4], "row alone")
    assert_bitwise_equal(jax.vmap(lambda r: ops.rms_norm(r, s))(x)[2], ops.rms_norm(x[2], s), "vmap")
    assert rel_err(out, rms_ref(np.asarray(x.astype(jnp.float32), np.float64), np.asarray(s.astype(jnp.float32), np.float64))) < TOL[jnp.dtype(dtype)]
    out0 = ops.rms_norm(x, s, offset=0.0, eps=1e-3)
    np.testing.assert_allclose(np.asarray(out0, np.float32), rms_ref(x, s, 1e-3, 0.0), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_with_residual_is_bitwise_residual_plus_norm(rng, dtype):
    """``rms_norm(x, s, residual=r)`` (one kernel) has the bits of ``r + rms_norm(x, s)`` (the
    model's unfused code, and on the CPU the plain-JAX reference, which reproduces interpret-mode
    bits only), rows stay batch-invariant, and its gradients equal the unfused ones bitwise (the
    residual's cotangent is g)."""
    x, s = randn(rng, (5, 3, 1100), dtype), randn(rng, (1100,), dtype, 0.1)
    r = randn(rng, (5, 3, 1100), dtype, 4.0)
    fused = ops.rms_norm(x, s, residual=r)
    assert_bitwise_equal(fused, r + ops.rms_norm(x, s), "fused vs r + norm")
    if not ON_GPU:
        ref = red.row_reduce_reference(x.reshape(15, 1100), "rms_norm", weight=s,
                                       residual=r.reshape(15, 1100))
        assert_bitwise_equal(fused.reshape(15, 1100), ref, "fused vs reference")
    assert_bitwise_equal(ops.rms_norm(x[3:4, 1:2], s, residual=r[3:4, 1:2])[0, 0], fused[3, 1],
                         "row alone")
    if dtype == jnp.float32:
        loss = lambda f: lambda x, s, r: jnp.sum(jnp.sin(f(x, s, r)))
        g1 = jax.grad(loss(lambda x, s, r: ops.rms_norm(x, s, residual=r)), (0, 1, 2))(x, s, r)
        g2 = jax.grad(loss(lambda x, s, r: r + ops.rms_norm(x, s)), (0, 1, 2))(x, s, r)
        for a, b, n in zip(g1, g2, ("dx", "dscale", "dresidual")):
            assert_bitwise_equal(a, b, n)


@pytest.mark.parametrize("name", ["sum", "max", "logsumexp", "softmax", "log_softmax"])
def test_zero_extension(rng, name):
    """A row extended with identities (0 for sum; masked -inf tail for the softmax family)."""
    f, _ = OPS[name]
    x = randn(rng, (4, 1000), jnp.float32, 3.0)
    fill = 0.0 if name == "sum" else -jnp.inf
    ref = f(x)
    for extra in (24, 25, 1048, 3000):
        xz = jnp.pad(x, ((0, 0), (0, extra)), constant_values=fill)
        out = f(xz)
        if name in ("softmax", "log_softmax"):
            out = out[:, :1000]
        assert_bitwise_equal(out, ref, f"{name} extended by {extra}")
    if name in ("softmax", "log_softmax", "logsumexp"):  # the same through where=
        mask = jnp.arange(1000 + 77) < 1000
        out = f(jnp.pad(x, ((0, 0), (0, 77)), constant_values=5.0), where=mask)
        assert_bitwise_equal(out[:, :1000] if name != "logsumexp" else out, ref, f"{name} where")


@pytest.mark.parametrize("axis", [0, 1, (0, 2), None, -1])
def test_any_axis_matches_jnp(rng, axis):
    x = randn(rng, (5, 6, 70), jnp.float32)
    for f, g in [(ops.sum, jnp.sum), (ops.mean, jnp.mean), (ops.max, jnp.max), (ops.min, jnp.min),
                 (ops.logsumexp, jax.nn.logsumexp)]:
        # Two f32 summation orders differ by up to ~eps * sum(|x|) (cancellation), so the absolute
        # tolerance scales with the magnitude of what is summed.
        atol = max(1e-5, 4e-7 * float(np.abs(np.asarray(x)).sum(axis=axis).max()))
        np.testing.assert_allclose(f(x, axis=axis), jax.jit(lambda v: g(v, axis=axis))(x),
                                   rtol=1e-5, atol=atol)
        # keepdims only changes the shape: traced, not compiled
        keep = [jax.eval_shape(lambda v, h=h: h(v, axis=axis, keepdims=True), x) for h in (f, g)]
        assert keep[0].shape == keep[1].shape
    if axis in (0, 1, -1):
        np.testing.assert_allclose(ops.softmax(x, axis), jax.nn.softmax(x, axis), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ops.log_softmax(x, axis), jax.nn.log_softmax(x, axis), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ops.argmax(x, axis), jnp.argmax(x, axis))
        np.testing.assert_array_equal(ops.argmin(x, axis), jnp.argmin(x, axis))


def test_reference_has_same_semantics(rng):
    if ON_GPU:
        pytest.skip("the reference reproduces interpret-mode bits")
    x, w = randn(rng, (3, 2100), jnp.float32), randn(rng, (2100,), jnp.float32)
    for op in red.OPS:
        assert_bitwise_equal(red.row_reduce(x, op, weight=w), red.row_reduce_reference(x, op, weight=w), op)


def test_gradients_match_and_are_deterministic(rng):
    x, s = randn(rng, (4, 6, 50), jnp.float32), randn(rng, (50,), jnp.float32, 0.1)
    cases = [
        (lambda x, s: ops.rms_norm(x, s), lambda x, s: rms_ref(x, s)),
        (lambda x, s: ops.softmax(x * s, axis=1), lambda x, s: jax.nn.softmax(x * s, axis=1)),
        (lambda x, s: ops.log_softmax(x * s), lambda x, s: jax.nn.log_softmax(x * s)),
        (lambda x, s: ops.logsumexp(x * s, axis=(0, 2)), lambda x, s: jax.nn.logsumexp(x * s, axis=(0, 2))),
        (lambda x, s: ops.mean(x * s, axis=0), lambda x, s: jnp.mean(x * s, axis=0)),
        (lambda x, s: ops.max(x * s, axis=1), lambda x, s: jnp.max(x * s, axis=1)),
    ]
    for f, g in cases:
        lf = lambda x, s: jnp.sum(jnp.sin(f(x, s)))
        lg = lambda x, s: jnp.sum(jnp.sin(g(x, s)))
        # jitted: run eagerly, every op of the backward passes compiled its own program (~150
        # programs, ~10 s); a second jit of the same gradient gives the run-to-run pair.
        ga, gb = jax.jit(jax.grad(lf, (0, 1)))(x, s), jax.jit(jax.grad(lg, (0, 1)))(x, s)
        for a, b in zip(ga, gb):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(ga, jax.jit(jax.grad(lf, (0, 1)))(x, s)):
            assert_bitwise_equal(a, b, "backward run-to-run")


def test_nan_inf_ieee_and_identical_in_batch(rng):
    x = randn(rng, (5, 300), jnp.float32)
    x = x.at[1, 3].set(jnp.nan).at[2, 7].set(jnp.inf).at[3, 9].set(-jnp.inf)
    x = x.at[4].set(-jnp.inf)
    for name, (f_eager, _) in OPS.items():
        # jitted: called eagerly, the kernel is compiled again for each of the five single rows
        f = jax.jit(f_eager)
        out = f(x)
        for i in range(5):
            assert_bitwise_equal(f(x[i:i + 1])[0], out[i], f"{name} row {i}")
        assert bool(jnp.all(jnp.isnan(out[1]))), name  # NaN propagates
    assert float(ops.max(x)[2]) == np.inf and float(ops.logsumexp(x)[2]) == np.inf
    assert float(ops.logsumexp(x)[4]) == -np.inf  # all -inf: -inf, like jax.nn.logsumexp
    assert bool(jnp.all(jnp.isnan(ops.softmax(x)[4])))  # like jax.nn.softmax: 0/0
    assert int(ops.argmax(x)[1]) == 3  # first NaN, like jnp.argmax


def test_negative_control_plain_xla_breaks():
    """The prefix check on XLA's own reductions fails somewhere: the check has teeth."""
    r = np.random.default_rng(1)
    if ON_GPU:  # candidates: long rows (few rows get split across blocks), the f32 softmax of GPU_FACTS
        cands = [(randn(r, (64, 262144), jnp.float32), jnp.sum, [1, 2, 8]),
                 (randn(r, (4096, 4096), jnp.float32), jax.nn.softmax, [7, 1000]),
                 (randn(r, (4096, 4096), jnp.float32), jnp.sum, [1, 7, 1000]),
                 (randn(r, (256, 65536), jnp.float32), jax.nn.logsumexp, [1, 3, 17])]
    else:  # XLA's CPU row sum changes bits with the number of rows (measured)
        cands = [(randn(r, (64, 1024), jnp.float32), jnp.sum, [1, 2, 3])]
    broken = []
    for x, f, ms in cands:
        g = jax.jit(lambda v: f(v, axis=-1))
        full = g(x)
        broken += [(f.__name__, x.shape, m) for m in ms if not bitwise_equal(g(x[:m]), full[:m])]
    assert broken, "plain XLA was batch-invariant on every shape tried: the control has no teeth"
    x = cands[0][0]
    ours = ops.sum(x)
    assert all(bitwise_equal(ops.sum(x[:m]), ours[:m]) for m in cands[0][2])


@settings(deadline=None)   # example count: the profile (tests/conftest.py)
@given(r=st.integers(1, 12), n=st.integers(1, 2200), dtype=st.sampled_from(DTYPES),
       name=st.sampled_from(list(OPS)), seed=st.integers(0, 2**31))
def test_property_row_alone_equals_row_in_batch(r, n, dtype, name, seed):
    rg = np.random.default_rng(seed)
    x = randn(rg, (r, n), dtype, 2.0)
    f = OPS[name][0]
    out = f(x)
    i = seed % r
    assert_bitwise_equal(f(x[i:i + 1])[0], out[i], f"{name} row {i}")


@pytest.mark.parametrize("call, exc, words", [
    (lambda: ops.sum(jnp.ones((3, 4), jnp.int32)), TypeError, "x must be a floating"),
    (lambda: ops.softmax(jnp.ones((3, 4)), axis=2), ValueError, "out of range"),
    (lambda: ops.sum(jnp.ones((3, 4)), axis=(0, 0)), ValueError, "repeats"),
    (lambda: ops.mean(jnp.ones((3, 4)), axis="a"), TypeError, "axis"),
    (lambda: ops.rms_norm(jnp.ones((3, 4)), jnp.ones((5,))), ValueError, "scale has shape"),
    (lambda: ops.rms_norm(jnp.ones((3, 4)), jnp.ones((4,)), eps=0.0), ValueError, "eps must be a positive"),
    (lambda: ops.rms_norm(jnp.ones((3, 4)), jnp.ones((4, 1))), ValueError, "scale must have rank 1"),
    (lambda: ops.rms_norm(jnp.ones((3, 4)), jnp.ones((4,)), residual=jnp.ones((3, 5))), ValueError, "residual must have"),
    (lambda: ops.rms_norm(jnp.ones((3, 4)), jnp.ones((4,)), residual=jnp.ones((3, 4), jnp.bfloat16)), ValueError, "residual must have"),
    (lambda: ops.max(jnp.ones((3, 0))), ValueError, "empty"),
    (lambda: ops.logsumexp(jnp.ones((3, 4)), backend="tpu"), ValueError, "tpu"),
])
def test_bad_input_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.skipif(not ON_GPU, reason="the register-resident row path exists on the GPU only")
@pytest.mark.parametrize("n", [1, 7, 1000, 1024, 1025, 4096, 5000, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_resident_rows_bitwise_equal_to_loop(rng, n, dtype):
    """Rows kept in registers (read once) run the loop's per-lane operations: the same bits."""
    x = randn(rng, (5, n), dtype) * 3
    x = x.at[2, n // 2].set(jnp.nan) if n > 1 else x
    w = randn(rng, (n,), dtype)
    for op in red.OPS:
        kw = dict(weight=w) if op == "rms_norm" else {}
        loop = red.row_reduce(x, op, resident=False, **kw)
        kept = red.row_reduce(x, op, resident=True, **kw)
        assert_bitwise_equal(kept, loop, f"{op} n={n}")


@pytest.mark.skipif(not ON_GPU, reason="the unrolled row loop exists on the GPU only")
@pytest.mark.parametrize("n", [16384, 16385, 40000, 256000])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_unrolled_loop_bitwise_equal(rng, n, dtype, monkeypatch):
    """Long rows load LOOP_UNROLL chunks per loop trip on the GPU; the fold runs the same per-lane
    operations in the same order as the one-chunk loop: the same bits (NaN row included)."""
    x = randn(rng, (3, n), dtype) * 3
    x = x.at[1, n // 3].set(jnp.nan)
    w = randn(rng, (n,), dtype)

    def run():
        jax.clear_caches()
        return {op: red.row_reduce(x, op, **(dict(weight=w) if op == "rms_norm" else {}))
                for op in red.OPS}

    unrolled = run()
    monkeypatch.setattr(red, "LOOP_UNROLL", 1)
    plain = run()
    monkeypatch.undo()
    jax.clear_caches()
    for op in red.OPS:
        assert_bitwise_equal(unrolled[op], plain[op], f"{op} n={n}: unrolled vs one chunk per trip")


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the kernels themselves")
@pytest.mark.parametrize("n", [300, 4096, 20000])
def test_gpu_lowering_of_every_row_kernel(monkeypatch, n):
    """On a CPU machine: every row kernel (registers-resident rows with mask-free whole chunks, the
    looped rows, RMSNorm with a residual) lowers through Pallas' Triton lowering for an H100, so a
    kernel that only the GPU path would run cannot break unnoticed on CPU CI."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration
    from pallas_kernels import backend as be
    if not hasattr(gpu_info, "_get_gpu_info_impl"):
        pytest.skip("this jax has no way to name an abstract GPU here")
    monkeypatch.setattr(be, "_platform", lambda: "gpu")
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))
    x = jax.ShapeDtypeStruct((8, n), jnp.bfloat16)
    w = jnp.ones((n,), jnp.bfloat16)
    for op in red.OPS:
        kw = dict(weight=w) if op == "rms_norm" else {}
        for resident in ((True, False) if n <= 8192 else (None,)):
            f = lambda v: red.row_reduce(v, op, backend="gpu", resident=resident, **kw)  # noqa: B023
            text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
            assert "detjax_row_" + op in text, op
    f = lambda v: red.row_reduce(v, "rms_norm", weight=w, backend="gpu", residual=v)
    assert "detjax_row_rms_norm" in jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
