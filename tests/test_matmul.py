"""detjax.ops.matmul / dot_general / einsum and the fixed-order matmul kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import (DTYPE_IDS, DTYPES, ON_GPU, TOL, assert_bitwise_equal, bitwise_equal,
                      gpu_only, randn, rel_err)
from detjax import ops
from pallas_kernels import matmul as mm

MS = [1, 2, 7, 8, 33, 128, 257]
K, N = 200, 130  # neither is a multiple of the 64-wide K tile or of the N tiles


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_invariance_prefixes_and_positions(rng, dtype):
    x = randn(rng, (max(MS), K), dtype)
    w = randn(rng, (K, N), dtype)
    full = ops.matmul(x, w)
    for m in MS:
        assert_bitwise_equal(ops.matmul(x[:m], w), full[:m], f"prefix m={m}")
    for i in (0, 5, 100, 256):
        assert_bitwise_equal(ops.matmul(x[i:i + 1], w)[0], full[i], f"row {i} alone")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vmap_and_run_to_run(rng, dtype):
    xs = randn(rng, (9, 3, K), dtype)
    w = randn(rng, (K, N), dtype)
    f = jax.jit(lambda x: ops.matmul(x, w))
    batched = jax.vmap(f)(xs)
    for i in (0, 4, 8):
        assert_bitwise_equal(batched[i], f(xs[i]), f"vmap row {i}")
    assert_bitwise_equal(f(xs[0]), f(xs[0]), "run-to-run")
    assert_bitwise_equal(ops.matmul(xs, w), ops.matmul(xs, w), "run-to-run eager")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_extension_of_k(rng, dtype):
    x = randn(rng, (7, 100), dtype)
    w = randn(rng, (100, 64), dtype)
    ref = ops.matmul(x, w)
    for extra in (1, 28, 29, 64, 300):
        xz = jnp.pad(x, ((0, 0), (0, extra)))
        wz = jnp.pad(w, ((0, extra), (0, 0)))
        assert_bitwise_equal(ops.matmul(xz, wz), ref, f"K zero-extended by {extra}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 64, 1), (7, 257, 33), (33, 1000, 200)])
def test_accuracy_vs_float64(rng, dtype, shape):
    m, k, n = shape
    x, w = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
    out = ops.matmul(x, w)
    assert out.dtype == jnp.dtype(dtype)
    ref = mm.matmul_f64_reference(x, w)
    # Normwise relative error, with the norm of the reference floored at the size a random-sign
    # sum of k products has (|x| @ |w| / sqrt(k)): a lone output (M = N = 1) can cancel to near
    # zero, and then its float32 rounding error (bounded by |x| @ |w|, not by |x @ w|) is large
    # next to it (H200 s16-2: 1 of 765 failed that way). Over many outputs the floor is below
    # the reference's own norm and this is the plain relative error.
    xa, wa = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64))
    err = rel_err(out, ref, floor=np.linalg.norm(xa @ wa) / math.sqrt(k))
    assert err < TOL[jnp.dtype(dtype)], (err, rel_err(out, ref))


def test_reference_has_same_semantics(rng):
    # On the interpret backend the plain-JAX reference reproduces the kernel's bits.
    if ON_GPU:
        pytest.skip("the reference reproduces interpret-mode bits, not the GPU's tensor-core bits")
    for dtype in DTYPES:
        x, w = randn(rng, (5, 150), dtype), randn(rng, (150, 40), dtype)
        assert_bitwise_equal(ops.matmul(x, w), mm.matmul_reference(x, w), f"{dtype} reference")


def test_dot_general_batch_dims_and_einsum(rng):
    q = randn(rng, (4, 9, 3, 16), jnp.float32)   # [b, t, h, d]
    k = randn(rng, (4, 11, 3, 16), jnp.float32)  # [b, s, h, d]
    s = ops.einsum("bthd,bshd->bhts", q, k)
    assert s.shape == (4, 3, 9, 11)
    np.testing.assert_allclose(s, jnp.einsum("bthd,bshd->bhts", q, k, precision="highest"), rtol=1e-5, atol=1e-5)
    # Batch invariance over b and over t.
    assert_bitwise_equal(ops.einsum("bthd,bshd->bhts", q[1:2], k[1:2])[0], s[1], "einsum batch")
    assert_bitwise_equal(ops.einsum("bthd,bshd->bhts", q[:, 2:3], k)[:, :, 0], s[:, :, 2], "einsum t")
    # Weight stored [N, K] (contracting dim last) goes through the transposed-B path.
    x, e = randn(rng, (6, 48), jnp.bfloat16), randn(rng, (300, 48), jnp.bfloat16)
    lo = ops.dot_general(x, e, (((1,), (1,)), ((), ())))
    assert_bitwise_equal(lo, ops.matmul(x, e.T), "transposed rhs path")
    assert_bitwise_equal(ops.dot_general(x[3:4], e, (((1,), (1,)), ((), ())))[0], lo[3], "row 3")
    # einsum with a summed-out index and 3 operands.
    a, b, c = (randn(rng, sh, jnp.float32) for sh in [(5, 6, 2), (6, 7), (7, 3)])
    np.testing.assert_allclose(ops.einsum("ijz,jk,kl->il", a, b, c),
                               jnp.einsum("ijz,jk,kl->il", a, b, c, precision="highest"), rtol=1e-5, atol=1e-5)


def test_matmul_shapes_like_jnp(rng):
    a, b = randn(rng, (2, 3, 5, 8), jnp.float32), randn(rng, (3, 8, 4), jnp.float32)
    hi = dict(precision="highest")  # XLA's default f32 dot on a GPU is TF32
    np.testing.assert_allclose(ops.matmul(a, b), jnp.matmul(a, b, **hi), rtol=1e-5, atol=1e-5)
    v = randn(rng, (8,), jnp.float32)
    np.testing.assert_allclose(ops.matmul(v, b[0]), jnp.matmul(v, b[0], **hi), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.matmul(a, v), jnp.matmul(a, v, **hi), rtol=1e-5, atol=1e-5)
    assert ops.matmul(jnp.zeros((0, 8)), b[0]).shape == (0, 4)


def test_gradients_match_and_are_deterministic(rng):
    x, w = randn(rng, (9, 70), jnp.float32), randn(rng, (70, 20), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    g = jax.grad(loss(ops.matmul), argnums=(0, 1))(x, w)
    g_ref = jax.jit(jax.grad(loss(lambda x, w: jnp.matmul(x, w, precision="highest")),
                             argnums=(0, 1)))(x, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    g2 = jax.grad(loss(ops.matmul), argnums=(0, 1))(x, w)
    for a, b in zip(g, g2):
        assert_bitwise_equal(a, b, "backward run-to-run")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_inf_propagate_identically(rng, dtype):
    x, w = randn(rng, (6, 80), dtype), randn(rng, (80, 16), dtype)
    x = x.at[2, 5].set(jnp.nan).at[4, 7].set(jnp.inf)
    mm = jax.jit(ops.matmul)   # called eagerly, each of the six single rows compiled the kernel again
    out = mm(x, w)
    assert bool(jnp.all(jnp.isnan(out[2])))
    assert bool(jnp.all(~jnp.isfinite(out[4])))  # inf * w gives +-inf per column
    assert bool(jnp.all(jnp.isfinite(out[jnp.array([0, 1, 3, 5])])))
    for i in range(6):
        assert_bitwise_equal(mm(x[i:i + 1], w)[0], out[i], f"row {i}")


def test_negative_control_plain_xla_breaks():
    """The same prefix check on XLA's own dot fails: the check has teeth."""
    r = np.random.default_rng(0)
    if ON_GPU:
        dtype, (m_full, k, n), ms = jnp.bfloat16, (1024, 4096, 4096), MS
    else:  # shapes where XLA's CPU dot was measured to change with M
        dtype, (m_full, k, n), ms = jnp.float32, (64, 4096, 512), [1, 2, 7, 8, 33]
    x, w = randn(r, (m_full, k), dtype), randn(r, (k, n), dtype)
    full = jnp.dot(x, w)
    broken = [m for m in ms if not bitwise_equal(jnp.dot(x[:m], w), full[:m])]
    assert broken, "plain XLA was batch-invariant on every shape tried: the control has no teeth"
    ours = ops.matmul(x, w)
    assert all(bitwise_equal(ops.matmul(x[:m], w), ours[:m]) for m in broken)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_configs_bitwise_identical(rng, dtype):
    """Per-shape M/N tiles are allowed only because every configuration gives the same bits."""
    a = randn(rng, (1, 300, 1000), dtype)
    b = randn(rng, (1, 1000, 520), dtype)
    outs = {name: mm.matmul_kernel_call(a, b, config=cfg) for name, cfg in mm.GPU_CONFIGS.items()}
    outs["transposed"] = mm.matmul_kernel_call(a, jnp.swapaxes(b, 1, 2), transpose_b=True)
    first = next(iter(outs.values()))
    for name, o in outs.items():
        assert_bitwise_equal(o, first, f"config {name}")


@gpu_only
def test_gpu_tf32_option_is_explicit_and_faster_algorithm(rng):
    x, w = randn(rng, (64, 512), jnp.float32), randn(rng, (512, 256), jnp.float32)
    full = ops.matmul(x, w)
    tf = ops.matmul(x, w, precision="tf32")
    ref = mm.matmul_f64_reference(x, w)
    assert rel_err(full, ref) < 2e-6 < rel_err(tf, ref) < 3e-3


@settings(deadline=None)   # example count: the profile (tests/conftest.py)
@given(m=st.integers(1, 40), k=st.integers(1, 150), n=st.integers(1, 140),
       dtype=st.sampled_from(DTYPES), row=st.integers(0, 39), seed=st.integers(0, 2**31))
def test_property_batch_invariance_and_accuracy(m, k, n, dtype, row, seed):
    r = np.random.default_rng(seed)
    x, w = randn(r, (m, k), dtype), randn(r, (k, n), dtype)
    out = ops.matmul(x, w)
    i = row % m
    assert_bitwise_equal(ops.matmul(x[i:i + 1], w)[0], out[i], "row alone")
    assert rel_err(out, mm.matmul_f64_reference(x, w)) < TOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("call, exc, words", [
    (lambda: ops.matmul(jnp.ones((3, 4), jnp.int32), jnp.ones((4, 2))), TypeError, "a must be a floating"),
    (lambda: ops.matmul(jnp.ones((3, 4)), jnp.ones((5, 2))), ValueError, "contracting dims do not match"),
    (lambda: ops.matmul(jnp.ones(()), jnp.ones((5, 2))), ValueError, "rank >= 1"),
    (lambda: ops.matmul(jnp.ones((3, 4)), jnp.ones((4, 2), jnp.complex64)), TypeError, "b must be a floating"),
    (lambda: ops.dot_general(jnp.ones((3, 4)), jnp.ones((4, 2)), (((2,), (0,)), ((), ()))), ValueError, "out of range"),
    (lambda: ops.dot_general(jnp.ones((3, 4)), jnp.ones((4, 2)), "bad"), ValueError, "dimension_numbers"),
    (lambda: ops.matmul(jnp.ones((3, 4)), jnp.ones((4, 2)), precision="bf16x9"), ValueError, "precision"),
    (lambda: ops.matmul(jnp.ones((3, 4)), jnp.ones((4, 2)), backend="cuda-fast"), ValueError, "backend"),
    (lambda: ops.matmul(jnp.ones((3, 4)), jnp.ones((4, 2)), preferred_element_type=jnp.int32), TypeError, "preferred_element_type"),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("split", [32, 96, 160])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_split_launch_gives_the_same_bits(rng, split, transpose_b):
    """Rows computed by a second launch into the first one's buffer: the same bits, every row."""
    a, b = randn(rng, (1, 300, 150), jnp.float32), randn(rng, (1, 150, 70), jnp.float32)
    bb = jnp.swapaxes(b, 1, 2) if transpose_b else b
    kw = {}
    if ON_GPU:   # forced tiles on the GPU: a big first tile, the default tail tile
        kw = dict(config=mm.GPU_CONFIGS["large"], tail_config=mm.TAIL_CONFIG)
        split = -(-split // 128) * 128
    one = mm.matmul_kernel_call(a, bb, transpose_b=transpose_b, **({"config": kw["config"]} if kw else {}))
    two = mm.matmul_kernel_call(a, bb, transpose_b=transpose_b, split_rows=split, **kw)
    assert_bitwise_equal(two, one, f"split at {split}")
    with pytest.raises(ValueError, match="split_rows"):
        mm.matmul_kernel_call(a, bb, transpose_b=transpose_b, split_rows=7, **kw)


def test_split_plan_targets_wave_quantisation():
    lw = mm.GPU_CONFIGS["large_wide"]
    assert mm.gpu_split_rows(1, 4096, 2304, lw, sms=132) == 3712      # 2B down: 2.18 -> 2.3 waves
    for m, n in [(4096, 2048), (8192, 8192), (4096, 9216), (1024, 4096), (4096, 4096)]:
        assert mm.gpu_split_rows(1, m, n, lw, sms=132) is None, (m, n)
    assert mm.gpu_split_rows(2, 4096, 2304, lw, sms=132) is None      # batched: one launch


def test_float32_highest_uses_fma_tiles():
    """f32 at 'highest' (an FMA chain on the GPU) gets 32-deep K tiles (s8-5: 12x faster than the
    tensor-core tiles, same bits: test_gpu_configs_bitwise_identical runs every GPU_CONFIGS entry);
    bf16/f16 and TF32 keep theirs; block_k is only ever lowered."""
    assert mm.uses_fma(jnp.float32, "highest") and not mm.uses_fma(jnp.float32, "tf32")
    assert not mm.uses_fma(jnp.bfloat16, "highest")
    assert mm.gpu_config_for(4096, 4096, 4096, fma=True) == mm.GPU_CONFIGS["fma"]
    assert mm.gpu_config_for(8, 9216, 2304, fma=True) == mm.GPU_CONFIGS["fma_small"]
    assert mm.gpu_config_for(8, 2304, 9216, fma=True) == mm.GPU_CONFIGS["small_deep"]   # < a wave
    assert mm.gpu_config_for(4096, 4096, 100, fma=True).block_k == 32
    assert mm.gpu_config_for(64, 4096, 2304, fma=True) == mm.GPU_CONFIGS["fma_small"]
    assert mm.gpu_config_for(4096, 4096, 4096).block_k == 64
    assert mm.gpu_config_for(8, 2304, 2304).block_k == 256
    assert mm.gpu_config_for(8, 2304, 9216) == mm.GPU_CONFIGS["small_deeper"]   # the 2B down proj.
    assert mm.gpu_config_for(8, 9216, 9216) == mm.GPU_CONFIGS["small_wide"]
    assert mm.gpu_config_for(32, 2304, 9216) == mm.GPU_CONFIGS["medium_deep"]


def test_gpu_tiles_fit_shared_memory_for_every_dtype():
    """A tile tuned for bf16 is shrunk (stages, then K tile) to fit f32 inputs' shared memory."""
    for name, cfg in list(mm.GPU_CONFIGS.items()) + [("tail", mm.TAIL_CONFIG)]:
        assert mm.fit_shared_memory(cfg, 2) == cfg, name            # bf16 tiles fit as tuned
        f32 = mm.fit_shared_memory(cfg, 4)
        assert (f32.block_m, f32.block_n, f32.num_warps) == (cfg.block_m, cfg.block_n, cfg.num_warps)
        assert max(f32.num_stages - 1, 1) * (f32.block_m + f32.block_n) * f32.block_k * 4 \
            <= mm.GPU_SMEM_BUDGET, name
    assert mm.fit_shared_memory(mm.GPU_CONFIGS["small_deep"], 4).num_stages < 6


# --- weights in "heads" layout [G, K, H]: grouped kernel and head_projections ---------------

def _heads_ref(x, w):
    """float64 ``einsum('...d,gdh->...gh')``."""
    return np.einsum("...d,gdh->...gh", np.asarray(jnp.asarray(x, jnp.float32), np.float64),
                     np.asarray(jnp.asarray(w, jnp.float32), np.float64))


@pytest.mark.parametrize("m,k", [(1, 130), (7, 100), (33, 64)])
def test_grouped_kernel_indexing_interpret(rng, m, k):
    """The grouped kernel's tile -> (weight, head, column) maps, run in interpret mode."""
    a = randn(rng, (m, k), jnp.float32)
    ws = tuple(randn(rng, (g, k, h), jnp.float32) for g, h in ((4, 32), (2, 64), (3, 16)))
    outs = mm.grouped_matmul_call(a, ws, _interpret_kernel=True, config=mm.TileConfig(16, 32, 64))
    for o, w in zip(outs, ws):
        ref = _heads_ref(a, w).reshape(m, -1)
        assert o.shape == ref.shape
        assert rel_err(o, ref) < 2e-6


def test_grouped_block_n():
    assert mm.grouped_block_n([256, 256], 256) == 256
    assert mm.grouped_block_n([256, 128], 256) == 128
    assert mm.grouped_block_n([96], 64) == 32
    assert mm.grouped_block_n([72], 64) is None     # falls back to the transposed matmul


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_head_projections_equal_separate_projections(rng, dtype):
    """Every output of head_projections has the bits of its own einsum (on the GPU: one launch of
    the grouped kernel), and rows are batch-invariant."""
    x = randn(rng, (5, 3, 96), dtype)
    ws = [randn(rng, (g, 96, 32), dtype) for g in (4, 2, 2)]
    outs = ops._linalg.head_projections(x, ws)
    for i, (o, w) in enumerate(zip(outs, ws)):
        assert_bitwise_equal(o, ops.einsum("BTD,NDH->BTNH", x, w), f"output {i} vs einsum")
        assert rel_err(o, _heads_ref(x, w)) < TOL[jnp.dtype(dtype)]
    alone = ops._linalg.head_projections(x[2:3, 1:2], ws)
    for i, (o, a) in enumerate(zip(outs, alone)):
        assert_bitwise_equal(a[0, 0], o[2, 1], f"output {i}: row alone vs in batch")


def test_head_projections_gradients(rng):
    x = randn(rng, (4, 64), jnp.float32)
    ws = [randn(rng, (g, 64, 16), jnp.float32) for g in (2, 1)]

    def loss(f):
        return lambda x, ws: sum(jnp.sum(jnp.sin(o)) for o in f(x, ws))
    got = jax.grad(loss(ops._linalg.head_projections), argnums=(0, 1))(x, ws)
    ref = lambda x, ws: [jnp.einsum("md,gdh->mgh", x, w, precision="highest") for w in ws]
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, ws)   # a yardstick: jitted
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, np.asarray(b, np.float64)) < 1e-5
    again = jax.grad(loss(ops._linalg.head_projections), argnums=(0, 1))(x, ws)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(again)):
        assert_bitwise_equal(a, b, "gradient run to run")


@pytest.mark.parametrize("call, words", [
    (lambda: ops._linalg.head_projections(jnp.ones((3, 4)), []), "at least one weight"),
    (lambda: ops._linalg.head_projections(jnp.ones((3, 4)), [jnp.ones((2, 5, 8))]), r"weights\[0\] must have shape"),
    (lambda: ops._linalg.head_projections(jnp.ones((3, 4)), [jnp.ones((4, 8))]), r"weights\[0\] must have shape"),
    (lambda: ops._linalg.head_projections(jnp.ones((3, 4), jnp.int32), [jnp.ones((1, 4, 8))]), "x must be a floating"),
])
def test_head_projections_bad_input(call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call()


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 8, 33, 300])
def test_gpu_grouped_matches_matmul(rng, dtype, m):
    """The grouped kernel (weights read in place, one launch) gives the bits of the plain kernel on
    the transposed weights, for decode and prefill row counts; dot_general on a [G, K, H] weight
    (which now takes the grouped kernel) too."""
    k = 320
    a = randn(rng, (m, k), dtype)
    ws = tuple(randn(rng, (g, k, h), dtype) for g, h in ((8, 128), (2, 128), (2, 128)))
    outs = mm.grouped_matmul_call(a, ws)
    for i, (o, w) in enumerate(zip(outs, ws)):
        plain = mm.matmul_kernel_call(a[None], jnp.transpose(w, (1, 0, 2)).reshape(1, k, -1))[0]
        assert_bitwise_equal(o, plain, f"weight {i}: grouped vs plain kernel")
        dg = ops.dot_general(a, w, (((1,), (1,)), ((), ())))
        assert_bitwise_equal(dg.reshape(m, -1), plain, f"weight {i}: dot_general on [G, K, H]")
    for name, cfg in mm.GPU_CONFIGS.items():
        o = mm.grouped_matmul_call(a, ws, config=cfg)[1]
        assert_bitwise_equal(o, outs[1], f"grouped kernel, config {name}")
