"""The Mosaic GPU matmul (pallas_kernels/matmul_mgpu.py) that the default path uses for some decode
shapes on Hopper GPUs.

The dispatch is allowed only because the kernel gives the Triton kernel's bits (same K order: 64-
aligned tiles from k = 0, one f32 accumulator, the tensor core's k-steps). On CPU: the dispatch
rule, argument errors, and that every tile the rule picks lowers for CUDA (plain and [G, K, H]
weights, bf16/f16 inputs, bf16/f16/f32 outputs). On a Hopper GPU: the Mosaic output equals the
Triton kernel's bit for bit at non-aligned M (1, 7, 33, 64) and at the gemma2_2b decode shapes,
``detjax.ops.matmul`` stays batch-invariant across the dispatch boundaries (M <= 16 Triton,
16 < M <= 64 Mosaic, M > 64 Triton), and the negative control (XLA's dot at the same shapes)
changes with M.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from detjax import ops
from pallas_kernels import matmul as mm
from pallas_kernels import matmul_mgpu as mg

HOPPER = mg.hopper_available()
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (Mosaic GPU wgmma)")


def bits(x):
    x = np.asarray(x)
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint16)


def randn(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ------------------------------------------------------------------------------------------------
# CPU


def test_dispatch_rule():
    bf = jnp.bfloat16
    assert mg.mgpu_tile_for(17, 9216, 9216, 2304, bf) == mg.WIDE         # up projection, decode
    assert mg.mgpu_tile_for(64, 9216, 9216, 2304, jnp.float16) == mg.WIDE
    assert mg.mgpu_tile_for(33, 2304, 2304, 9216, bf) == mg.DEEP         # down projection
    assert mg.mgpu_tile_for(8, 9216, 9216, 2304, bf) is None             # M <= 16: slower in generation
    assert mg.mgpu_tile_for(16, 2304, 2304, 9216, bf) is None
    assert mg.mgpu_tile_for(65, 9216, 9216, 2304, bf) is None            # beyond one 64-row tile
    assert mg.mgpu_tile_for(33, 9216, 9216, 2304, jnp.float32) is None   # f32: Triton FMA tiles
    assert mg.mgpu_tile_for(33, 9200, 9200, 2304, bf) is None            # N not a tile multiple
    assert mg.mgpu_tile_for(33, 9216, 9216, 2300, bf) is None            # K not a tile multiple
    assert mg.mgpu_tile_for(33, 256, 2048, 2304, bf) is None             # narrow: q projection


def test_bad_input():
    a, b = jnp.zeros((64, 256), jnp.bfloat16), jnp.zeros((256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="K = 256"):
        mg.mgpu_matmul_call(a, b[:128])
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mg.mgpu_matmul_call(a.astype(jnp.float32), b.astype(jnp.float32))
    with pytest.raises(ValueError, match="M % 64"):
        mg.mgpu_matmul_call(a[:8], b, tile_n=128, tile_k=128)


@pytest.mark.parametrize("m,k,b_shape,dtype,out_dtype", [
    (17, 2304, (2304, 9216), jnp.bfloat16, jnp.float32),     # WIDE, f32 output
    (64, 2304, (1, 2304, 9216), jnp.float16, jnp.float16),   # WIDE, [G, K, H] weight
    (20, 1024, (2, 1024, 4096), jnp.bfloat16, jnp.bfloat16), # WIDE, two groups
    (33, 9216, (9216, 2304), jnp.float16, jnp.float16),      # DEEP
    (17, 8192, (8192, 64), jnp.bfloat16, jnp.float32),       # DEEP, one column tile, f32 output
])
def test_lowers_for_cuda(m, k, b_shape, dtype, out_dtype):
    n = b_shape[-1] * (b_shape[0] if len(b_shape) == 3 else 1)
    tile = mg.mgpu_tile_for(m, b_shape[-1], n, k, dtype)
    assert tile is not None
    a = jax.ShapeDtypeStruct((m, k), dtype)
    b = jax.ShapeDtypeStruct(b_shape, dtype)
    text = jax.jit(lambda a, b: mg.matmul(a, b, tile=tile, out_dtype=out_dtype)).trace(a, b).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ------------------------------------------------------------------------------------------------
# GPU (Hopper)

SHAPES = [(2304, 9216), (9216, 2304), (2048, 6144), (4096, 8192)]


@hopper_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_mosaic_matmul_gives_the_triton_bits(dtype):
    """Every tile of both kernels, at the shapes the rule dispatches and others: the same bits."""
    checked = 0
    for si, (k, n) in enumerate(SHAPES):
        w = randn(100 + si, (k, n), dtype)
        for m in (1, 7, 33, 64):
            a = randn(m + si, (m, k), dtype)
            ref = mm.matmul_kernel_call(a[None], w[None], config=mm.gpu_config_for(m, n, k))[0]
            for tile in (mg.WIDE, mg.DEEP, mg.MgpuTile(32, 128, 4)):
                if n % tile.tile_n or k % tile.tile_k:
                    continue
                out = jax.jit(lambda a, w, t=tile: mg.matmul(a, w, tile=t))(a, w)
                np.testing.assert_array_equal(bits(out), bits(ref), err_msg=f"M={m} K={k} N={n} {tile}")
                checked += 1
            out32 = mg.matmul(a, w, tile=mg.WIDE if n % 128 == 0 else mg.DEEP, out_dtype=jnp.float32)
            ref32 = mm.matmul_kernel_call(a[None], w[None], out_dtype=jnp.float32,
                                          config=mm.gpu_config_for(m, n, k))[0]
            np.testing.assert_array_equal(bits(out32), bits(ref32), err_msg=f"f32 out M={m} K={k} N={n}")
    assert checked >= 30


@hopper_only
def test_gpu_grouped_weights_give_the_triton_bits():
    """[G, K, H] weights read in place (Gemma's gate/up) = the grouped Triton launch."""
    a = randn(0, (33, 2304), jnp.bfloat16)
    ws = (randn(1, (1, 2304, 9216), jnp.bfloat16), randn(2, (2, 2304, 4096), jnp.bfloat16))
    outs = mm.grouped_matmul_call(a, ws)   # dispatched to Mosaic: both weights are wide
    cfg = mm.gpu_config_for(33, sum(w.shape[0] * w.shape[2] for w in ws), 2304)
    refs = mm.grouped_matmul_call(a, ws, config=cfg)   # an explicit tile: the Triton launch
    for o, r in zip(outs, refs):
        np.testing.assert_array_equal(bits(o), bits(r))


@hopper_only
@pytest.mark.parametrize("k,n", [(2304, 9216), (9216, 2304)])
def test_gpu_batch_invariance_across_the_dispatch_boundary(k, n):
    """Rows of ``x[:m] @ W`` for m on both sides of the dispatch (33, 64: Mosaic; 1, 8, 65 and the
    full 300: Triton) equal the rows of the full product; XLA's dot does not."""
    x = randn(5, (300, k), jnp.bfloat16)
    w = randn(6, (k, n), jnp.bfloat16)
    full = bits(jax.jit(ops.matmul)(x, w))
    for m in (1, 8, 33, 64, 65):
        np.testing.assert_array_equal(bits(jax.jit(ops.matmul)(x[:m], w)), full[:m], err_msg=f"m={m}")
    xla = lambda a: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    xfull = bits(jax.jit(xla)(x))
    assert any((bits(jax.jit(xla)(x[:m])) != xfull[:m]).any() for m in (1, 8, 33, 64, 65)), \
        "negative control: XLA's dot gave the same rows at every M (the check would have no teeth)"


def _stand_in(monkeypatch):
    """Replace the Mosaic kernel by the (interpreted) Triton kernel, so that the dispatch plumbing
    (the vmap rule, [G, K, H] columns) runs on any machine; record the ``[B, M, K]`` shapes the
    Triton kernel is called with."""
    calls = []
    triton, grouped = mm.matmul_kernel_call, mm.grouped_matmul_call

    def spy(a, b, **kw):
        calls.append(tuple(a.shape))
        return triton(a, b, **kw)

    def spy_grouped(a, ws, **kw):   # on the GPU the grouped Triton kernel is its own launch
        calls.append(("grouped",) + tuple(a.shape))
        return grouped(a, ws, **kw)

    def fake(a, w, *, tile, out_dtype):
        return triton(a[None], mm._as_columns(w)[None], out_dtype=out_dtype)[0]

    monkeypatch.setattr(mg, "matmul", fake)
    monkeypatch.setattr(mm, "matmul_kernel_call", spy)
    monkeypatch.setattr(mm, "grouped_matmul_call", spy_grouped)
    return calls


@pytest.mark.parametrize("grouped", [False, True])
def test_vmap_rule_turns_the_mapped_axis_into_rows(monkeypatch, grouped):
    """``jax.vmap`` of the Mosaic dispatch: the kernel is called once on ``[V * M, K]`` rows (not
    batched), mapped weights go to the batched Triton kernel, and every example's result has
    bitwise the unmapped call's values."""
    calls = _stand_in(monkeypatch)
    dt = jnp.bfloat16
    xs = randn(0, (3, 20, 128), dt)
    w = randn(1, (2, 128, 64), dt) if grouped else randn(1, (128, 128), dt)
    f = lambda x, w: mm._mosaic_rows(x, w, mg.WIDE, jnp.dtype(dt))  # noqa: E731
    out = jax.vmap(f, in_axes=(0, None))(xs, w)
    if grouped:   # one grouped call on the 3 x 20 rows (interpret mode: one kernel per weight)
        assert calls in ([("grouped", 60, 128), (1, 60, 128)], [("grouped", 60, 128)]), calls
    else:         # one call on the 3 x 20 rows
        assert calls == [(1, 60, 128)], calls
    for i in range(3):
        np.testing.assert_array_equal(bits(out[i]), bits(f(xs[i], w)))
    ws = jnp.stack([w, 2 * w, -w])
    calls.clear()
    out_w = jax.vmap(f)(xs, ws)          # mapped weights: the batched Triton kernel
    assert calls == [(3, 20, 128)], calls
    for i in range(3):
        np.testing.assert_array_equal(bits(out_w[i]), bits(f(xs[i], ws[i])))
    np.testing.assert_array_equal(bits(jax.vmap(f, in_axes=(None, 0))(xs[0], ws)[1]),
                                  bits(f(xs[0], ws[1])))
