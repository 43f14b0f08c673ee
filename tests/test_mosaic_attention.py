"""detjax.experimental.mosaic_attention: the Mosaic GPU attention kernel (pallas_kernels/attention_mgpu.py).

On CPU: argument errors, the CTA block ranges (and full ranges), that every configuration *lowers*
for CUDA in both row layouts (Pallas -> Mosaic GPU, run on this machine: shapes, layouts and the
kernel's Python all checked), and that the backward glue reproduces detjax.ops.attention's gradients.
The kernel itself runs only on a Hopper GPU; the GPU tests below check what the probe runs s10-6 and
s10-7 (results/README.md, session 10) showed for the same kernel: accuracy against float64, batch and
vmap invariance, decode = prefill, the two row layouts, chunked prefill = full prefill, empty
rows, gradients (close to the Triton path's, batch-invariant, run to run), all bitwise. They
skip without a GPU that runs Mosaic GPU. Tolerance against float64 (max |out - ref| / max |ref|):
bf16 2e-2, f16 3e-3, as for detjax.ops.attention.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from detjax import experimental as X
from pallas_kernels import attention as K
from pallas_kernels import attention_mgpu as M

GPU, WHY = X.mosaic_available()
gpu_only = pytest.mark.skipif(not GPU, reason=f"Mosaic GPU kernel: {WHY}")
TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}


def bits(x):
    return np.asarray(x).view(np.uint16)


def qkv(seed, b, t, s, n, kh, h, dtype):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))


# ------------------------------------------------------------------------------------------------
# CPU


def test_bad_input():
    q, k, v = qkv(0, 1, 4, 8, 4, 2, 64, jnp.bfloat16)
    with pytest.raises(TypeError, match="q must be bfloat16 or float16"):
        X.mosaic_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    big = jnp.zeros((1, 4, 4, 320), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim of q must be at most 256"):
        X.mosaic_attention(big, big[:, :, :2], big[:, :, :2])
    with pytest.raises(ValueError, match="positive multiple of the number of KV heads"):
        X.mosaic_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="sliding_window must be positive"):
        X.mosaic_attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="kv_lengths"):
        X.mosaic_attention(q, k, v, kv_lengths=jnp.array([9]))
    with pytest.raises(TypeError, match="k_cache"):
        X.mosaic_decode_attention(q, k.astype(jnp.float16), v, jnp.array([8]))
    with pytest.raises(ValueError, match="layout must be one of"):
        X.mosaic_attention(q, k, v, layout="rows")
    if not GPU:   # arguments are checked first, then the device
        with pytest.raises(NotImplementedError, match="Hopper"):
            X.mosaic_attention(q, k, v)


@pytest.mark.parametrize("cta", [64, 128])
@pytest.mark.parametrize("bk", [64, 128])
def test_block_ranges_match_brute_force(bk, cta):
    rng = np.random.default_rng(3)
    b, rp, real = 2, 384, 300
    lo = rng.integers(0, 500, (b, rp))
    hi = lo + rng.integers(-50, 300, (b, rp))
    hi[0, :128] = lo[0, :128]          # a CTA whose rows are all empty
    lo[1, 128:256] = rng.integers(0, 20, 128)   # a CTA where every row is valid over a long range
    hi[1, 128:256] = rng.integers(700, 900, 128)
    got = np.asarray(M.block_ranges(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), real, bk,
                                    cta))
    assert got.shape == (b, rp // cta, 4)
    saw_full = False
    for i in range(b):
        for c in range(rp // cta):
            rows = slice(c * cta, (c + 1) * cta)
            ne = hi[i, rows] > lo[i, rows]
            start, end, fs, fe = got[i, c]
            if not ne.any():
                assert (start, end, fs, fe) == (0, 0, 0, 0)
                continue
            blocks = {j for lo_, hi_ in zip(lo[i, rows][ne], hi[i, rows][ne])
                      for j in range(lo_ // bk, -(-hi_ // bk))}
            assert (start, end) == (min(blocks), max(blocks) + 1)
            # the full range: exactly the blocks inside every real row's interval
            is_real = np.arange(c * cta, (c + 1) * cta) < real
            full = [j for j in range(start, end)
                    if all(lo_ <= j * bk and (j + 1) * bk <= hi_
                           for lo_, hi_ in zip(lo[i, rows][is_real], hi[i, rows][is_real]))]
            full = full if is_real.any() else []     # a CTA of padding rows only: none
            assert start <= fs <= fe <= end
            assert list(range(fs, fe)) == full, (i, c, fs, fe, full)
            saw_full |= bool(full)
    assert saw_full


LOWER_CASES = {
    "bf16 H128 causal GQA": (jnp.bfloat16, 2, 300, 300, 8, 2, 128, {}),
    "f16 H256 window cap lengths": (jnp.float16, 2, 200, 200, 4, 4, 256,
                                    dict(sliding_window=50, soft_cap=30.0, lengths=True)),
    "bf16 H64 decode 1 token": (jnp.bfloat16, 3, 1, 1000, 8, 1, 64, dict(decode=True)),
    "bf16 H40 non-causal": (jnp.bfloat16, 1, 70, 70, 2, 1, 40, dict(causal=False)),
    # opt-in key splits: prefill CTAs merging three splits (the running total in global memory)
    "bf16 H256 prefill 3 splits": (jnp.bfloat16, 1, 2100, 2100, 4, 2, 256, dict(splits=True)),
    # ... and in registers (``REGISTER_TOTAL_MAX_HV``: value tiles up to 128 wide)
    "bf16 H64 prefill 3 splits": (jnp.bfloat16, 1, 2100, 2100, 4, 2, 64, dict(splits=True)),
}


# Value columns are split only at padded head dims >= 128: below that (1, 2) would lower exactly
# what (1, 1) lowers, so it is not generated.
LOWER_PARAMS = [(name, layout, wgs, ve) for name in LOWER_CASES for layout in ("tokens", "packed")
                for wgs, ve in ((None, 1), (1, 1), (2, 1), (1, 2))
                if (ve == 1 or M.padded_head_dim(LOWER_CASES[name][6]) >= 128)
                and ("splits" not in name or (wgs, ve) == (None, 1))]   # CTA shapes: covered above


@pytest.mark.parametrize("h", [64, 128, 256])
@pytest.mark.parametrize("split_parallel", [True, False])
def test_split_decode_lowers_for_cuda(split_parallel, h):
    """Decode over three key splits lowers for CUDA both ways: one CTA per (row block, split) plus
    the merge kernel (the default for decode), and the one-kernel merge (prefill's form)."""
    q, k, v = qkv(2, 2, 1, 2500, 8, 2, h, jnp.bfloat16)
    lengths = jnp.array([2500, 1100], jnp.int32)
    f = lambda q, k, v, p, l: M.forward(  # noqa: E731
        q, k, v, p, l, causal=True, sliding_window=None, soft_cap=30.0, scale=h ** -0.5,
        layout="packed", splits=True, split_parallel=split_parallel)
    text = jax.jit(f).trace(q, k, v, lengths[:, None] - 1, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2 and "wgmma" in text
    # merges by explicitly rounded PTX (``_rn``): the same rounding in both kernels, never an FMA
    assert "mul.rn.f32" in text and "add.rn.f32" in text


def test_split_defaults_and_bad_values():
    assert M.num_splits(1) == M.num_splits(1024) == 1 and M.num_splits(1025) == 2
    assert M.split_blocks(128) == 8 and M.split_blocks(64) == 16
    assert M.default_split_parallel("packed", 1, 2) and not M.default_split_parallel("packed", 1, 1)
    assert not M.default_split_parallel("tokens", 2, 8) and not M.default_split_parallel("packed", 2, 8)
    q, k, v = qkv(3, 1, 1, 2000, 4, 1, 64, jnp.bfloat16)
    pos, lens = jnp.array([[1999]], jnp.int32), jnp.array([2000], jnp.int32)
    for kw in (dict(layout="tokens", splits=True, split_parallel=True),
               dict(layout="packed", splits=False, split_parallel=True), dict(layout="packed", split_parallel=True)):
        with pytest.raises(ValueError, match="split_parallel needs"):
            M.forward(q, k, v, pos, lens, causal=True, sliding_window=None, soft_cap=None, scale=0.1, **kw)


def test_merge_rule_is_exact_for_empty_states():
    """``_merge_coeffs`` / ``_merge_chunk`` (the kernel's merge, here on plain arrays): an empty
    split leaves the total bitwise, an empty total takes the split bitwise, two empties stay empty
    (no NaN), and two real states give the rescaled sum."""
    inf = np.float32(np.inf)
    m_t = jnp.array([-inf, 3.0, -inf, 2.0], jnp.float32)
    m_s = jnp.array([1.5, -inf, -inf, 5.0], jnp.float32)
    tot = jnp.array([[0.0, 0.0], [1.25, -7.0], [0.0, 0.0], [3.0, 1.0]], jnp.float32)
    part = jnp.array([[2.5, -1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 4.0]], jnp.float32)
    a, b, m_new = M._merge_coeffs(m_t, m_s)
    got = np.asarray(M._merge_chunk(a, b, tot, part, mul=jnp.multiply, add=jnp.add))
    l_t, l_s = jnp.array([0.0, 2.0, 0.0, 2.0]), jnp.array([3.0, 0.0, 0.0, 3.0])
    l_new = np.asarray(M._merge_chunk(a, b, l_t, l_s, mul=jnp.multiply, add=jnp.add))
    assert np.array_equal(l_new, [3.0, 2.0, 0.0, 2.0 * 2.0 ** -3 + 3.0])
    assert np.array_equal(got[0], np.asarray(part[0])) and np.array_equal(got[1], np.asarray(tot[1]))
    assert np.array_equal(got[2], [0.0, 0.0]) and not np.signbit(got[2]).any()
    np.testing.assert_allclose(got[3], np.asarray(tot[3]) * 2.0 ** -3 + np.asarray(part[3]), rtol=1e-6)
    assert np.array_equal(np.asarray(m_new), [1.5, 3.0, -inf, 5.0])


@pytest.mark.parametrize("name,layout,wgs,ve", LOWER_PARAMS)
def test_lowers_for_cuda(name, layout, wgs, ve):
    """Pallas -> Mosaic GPU lowering of the whole forward (layout, block ranges, kernel) for
    CUDA, on whatever machine runs the tests, in both row layouts, with one or two compute
    warpgroups per CTA (None: the default for the shape) and split value columns."""
    dt, b, t, s, n, kh, h, opt = LOWER_CASES[name]
    q, k, v = qkv(1, b, t, s, n, kh, h, dt)
    lengths = jnp.full((b,), s, jnp.int32) if not opt.get("lengths") else jnp.array([s, s // 2], jnp.int32)
    pos = (lengths[:, None] - 1) if opt.get("decode") else K.default_q_positions(b, t, s)
    f = lambda q, k, v, p, l: M.forward(  # noqa: E731
        q, k, v, p, l, causal=opt.get("causal", True), sliding_window=opt.get("sliding_window"),
        soft_cap=opt.get("soft_cap"), scale=h ** -0.5, layout=layout, compute_wgs=wgs,
        value_splits=ve, splits=opt.get("splits"))
    text = jax.jit(f).trace(q, k, v, pos, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "wgmma" in text
    # the explicitly rounded merge / lse instructions (``_rn``) only in the split order: the order
    # without splits keeps the arithmetic whose bits are recorded
    assert ("mul.rn.f32" in text and "add.rn.f32" in text) == bool(opt.get("splits")), name


def test_split_prefill_register_total_lowers_for_cuda(monkeypatch):
    """Head dim 128 with the split prefill's running total in registers (``REGISTER_TOTAL_MAX_HV``
    = 128, the default) and in the global scratch (64): both lower, the first without the
    scratch output."""
    q, k, v = qkv(3, 1, 2100, 2100, 4, 2, 128, jnp.bfloat16)
    args = (q, k, v, K.default_q_positions(1, 2100, 2100), jnp.full((1,), 2100, jnp.int32))
    texts = {}
    for hv in (64, 128):
        monkeypatch.setattr(M, "REGISTER_TOTAL_MAX_HV", hv)
        f = lambda *a: M.forward(*a, causal=True, sliding_window=None, soft_cap=None,  # noqa: E731
                                 scale=0.1, splits=True)   # a new function: jit traces it anew
        texts[hv] = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mul.rn.f32" in texts[hv] and "wgmma" in texts[hv]
    # the scratch is the kernel's third output, [B, N, rows, 128] float32
    assert "tensor<1x4x2176x128xf32>" in texts[64] and "tensor<1x4x2176x128xf32>" not in texts[128]


def test_compute_warpgroups_default_and_bad_values():
    # one compute warpgroup only for packed rows that fit in its 64 (a decode step)
    assert M.default_compute_wgs("packed", 2) == 1 and M.default_compute_wgs("packed", 64) == 1
    assert M.default_compute_wgs("packed", 65) == 2 and M.default_compute_wgs("tokens", 8) == 2
    # three K/V slots where they fit with the q tiles (bf16: head dim 128 with one warpgroup)
    assert M.pipeline_steps(128, 1, 128) == 3 and M.pipeline_steps(128, 2, 128) == 2
    assert M.pipeline_steps(256, 1, 64) == 2 and M.pipeline_steps(256, 1, 64, value_splits=4) == 3
    # value columns split only for one-warpgroup CTAs, while the grid stays under 2 CTAs per SM
    assert [M.default_value_splits(256, c, 1) for c in (1, 32, 66, 132, 256)] == [4, 4, 4, 2, 1]
    assert M.default_value_splits(128, 32, 1) == 2 and M.default_value_splits(64, 1, 1) == 1
    assert M.default_value_splits(256, 32, 2) == 1
    q, k, v = qkv(0, 1, 4, 8, 4, 2, 64, jnp.bfloat16)
    pos, lens = K.default_q_positions(1, 4, 8), jnp.array([8], jnp.int32)
    with pytest.raises(ValueError, match="compute_wgs must be"):
        M.forward(q, k, v, pos, lens, causal=True, sliding_window=None, soft_cap=None, scale=0.1,
                  compute_wgs=3)
    with pytest.raises(ValueError, match="value_splits must divide"):
        M.forward(q, k, v, pos, lens, causal=True, sliding_window=None, soft_cap=None, scale=0.1,
                  value_splits=2)   # head dim 64: no 64-column parts


def test_block_k_by_head_dim():
    assert [M.block_k(M.padded_head_dim(h)) for h in (40, 64, 128, 192, 256)] == [128, 128, 128, 64, 64]


@pytest.mark.parametrize("kw", [{}, dict(sliding_window=5, logits_soft_cap=20.0, lengths=True)])
def test_triton_backward_glue_is_the_ops_backward(kw):
    """``triton_backward`` (the Mosaic path's backward: public-layout o/lse repacked for the Triton
    backward kernels) gives bitwise the gradients of ``detjax.ops.attention`` when fed that op's own
    o and lse: the glue adds nothing (interpret mode, GQA, ragged lengths)."""
    b, t, n, kh, h = 2, 37, 4, 2, 24
    q, k, v = qkv(7, b, t, t, n, kh, h, jnp.float32)
    do = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape), jnp.float32)
    lengths = jnp.array([t, 20], jnp.int32) if kw.get("lengths") else jnp.full((b,), t, jnp.int32)
    pos = K.default_q_positions(b, t, t)
    opts = dict(causal=True, sliding_window=kw.get("sliding_window"), soft_cap=kw.get("logits_soft_cap"),
                scale=h ** -0.5)
    qp, kp, vp, lo, hi, kvl = K.prepare(q, k, v, pos, lengths, causal=True,
                                        sliding_window=opts["sliding_window"])
    cfg = K.AttnConfig(opts["scale"], opts["soft_cap"], "interpret")
    op, lsep = K.attention_fwd_call(qp, kp, vp, lo, hi, kvl, cfg)
    o = K.unpack_rows(op, t, n, h)
    lse = K.unpack_row_scalars(lsep, t, n)
    got = X.triton_backward(q, k, v, pos, lengths, o, lse, do, backend="interpret", **opts)
    ops_kw = dict(sliding_window=opts["sliding_window"], logits_soft_cap=opts["soft_cap"],
                  scale=opts["scale"], kv_lengths=lengths, backend="interpret")
    from detjax import ops
    _, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, **ops_kw), q, k, v)
    for a, e in zip(got, vjp(do)):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(e).view(np.uint32))


def test_gradient_traces(monkeypatch):
    """jax.grad through the Mosaic forward traces to the Mosaic kernel plus the Triton backward
    kernels (lowering the Triton kernels needs a GPU; the GPU tests run them)."""
    from pallas_kernels import backend as _backend
    monkeypatch.setattr(_backend, "_platform", lambda: "gpu")
    q, k, v = qkv(2, 1, 128, 128, 2, 1, 64, jnp.bfloat16)
    pos, lens = K.default_q_positions(1, 128, 128), jnp.array([128], jnp.int32)

    def loss(q, k, v):
        return X._forward(q, k, v, pos, lens, True, None, 30.0, 0.125, None).astype(jnp.float32).sum()

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert "collective_axes=('wg',)" in text   # the Mosaic GPU kernel's warpgroups
    assert "detjax_attention_bwd_dkv" in text and "detjax_attention_bwd_dq" in text


# ------------------------------------------------------------------------------------------------
# GPU (Hopper): the guarantees, bitwise


@gpu_only
@pytest.mark.parametrize("layout", ["tokens", "packed"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_accuracy(dtype, layout):
    for seed, (b, t, n, kh, h), kw in [(10, (2, 333, 8, 2, 128), {}),
                                       (12, (1, 200, 4, 1, 64), dict(causal=False)),
                                       (11, (3, 200, 4, 4, 256),
                                        dict(sliding_window=64, logits_soft_cap=30.0,
                                             kv_lengths=jnp.array([200, 150, 70], jnp.int32))),
                                       (13, (1, 2600, 4, 2, 256), {}),   # several 1024-key spans
                                       (14, (2, 2100, 4, 1, 128),
                                        dict(kv_lengths=jnp.array([2100, 1500], jnp.int32)))]:
        q, k, v = qkv(seed, b, t, t, n, kh, h, dtype)
        out = np.asarray(X.mosaic_attention(q, k, v, layout=layout, **kw), np.float64)
        ref = K.attention_f64_reference(q, k, v, **kw)
        err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
        assert err < TOL[jnp.dtype(dtype)], (seed, err)


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_layouts_give_the_same_bits(dtype):
    """'tokens' CTAs (128 tokens of one query head) and 'packed' CTAs ((token, head) rows of one KV
    head) group rows differently, so they mask different blocks: the bits must not move."""
    cases = [((2, 300, 8, 2, 128), {}),
             ((1, 257, 4, 4, 64), dict(sliding_window=1)),
             ((2, 640, 8, 4, 256), dict(sliding_window=200, logits_soft_cap=50.0,
                                        kv_lengths=jnp.array([640, 333], jnp.int32))),
             ((2, 384, 4, 1, 128), dict(causal=False, kv_lengths=jnp.array([384, 5], jnp.int32)))]
    for i, ((b, t, n, kh, h), kw) in enumerate(cases):
        q, k, v = qkv(60 + i, b, t, t, n, kh, h, dtype)
        a = bits(X.mosaic_attention(q, k, v, layout="tokens", **kw))
        p = bits(X.mosaic_attention(q, k, v, layout="packed", **kw))
        assert np.array_equal(a, p), (i, int(np.sum(a != p)))
    # a chunk of queries late in a long sequence (q_positions), both layouts
    q, k, v = qkv(70, 1, 1500, 1500, 8, 2, 128, dtype)
    pos = jnp.arange(1100, 1400, dtype=jnp.int32)[None]
    a = bits(X.mosaic_attention(q[:, 1100:1400], k, v, q_positions=pos, layout="tokens"))
    p = bits(X.mosaic_attention(q[:, 1100:1400], k, v, q_positions=pos, layout="packed"))
    assert np.array_equal(a, p)


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_cta_height_gives_the_same_bits(dtype):
    """One compute warpgroup per CTA (64 rows, decode's default) or two (128 rows, prefill's),
    2 or 3 K/V pipeline slots, value columns split over 1, 2 or 4 CTAs: the same bits, in both
    layouts (rows never interact, output columns are dots over the same keys)."""
    cases = [((2, 5, 1000, 8, 4, 256), dict(soft_cap=50.0, lengths=(1000, 613))),
             ((3, 1, 777, 8, 1, 128), dict(sliding_window=300, lengths=(777, 65, 1))),
             ((2, 300, 300, 8, 2, 128), {}),
             ((1, 200, 200, 4, 4, 64), dict(causal=False))]
    for i, ((b, t, s, n, kh, h), opt) in enumerate(cases):
        q, k, v = qkv(90 + i, b, t, s, n, kh, h, dtype)
        lens = jnp.array(opt.get("lengths", (s,) * b), jnp.int32)
        pos = jnp.maximum(lens[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None], 0)
        run = lambda layout, wgs, steps, ve=1: bits(M.forward(  # noqa: E731
            q, k, v, pos, lens, causal=opt.get("causal", True),
            sliding_window=opt.get("sliding_window"), soft_cap=opt.get("soft_cap"),
            scale=h ** -0.5, layout=layout, compute_wgs=wgs, steps=steps, value_splits=ve)[0])
        ref = run("packed", 2, 2)
        configs = [("packed", 1, 2), ("tokens", 1, None), ("tokens", 2, None), ("packed", None, None)]
        configs += [("packed", 1, 3)] if M.pipeline_steps(h, 1, M.block_k(h)) == 3 else []
        configs += [("packed", 1, None, ve) for ve in (2, 4) if h // ve >= 64]
        for cfg in configs:
            got = run(*cfg)
            assert np.array_equal(got, ref), (i, cfg, int(np.sum(got != ref)))


@gpu_only
def test_gpu_batch_and_vmap_invariance():
    for h in (128, 256):
        q, k, v = qkv(20, 6, 257, 257, 8, 2, h, jnp.bfloat16)
        full = bits(X.mosaic_attention(q, k, v))
        for i in (0, 3, 5):
            alone = bits(X.mosaic_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]))[0]
            assert np.array_equal(full[i], alone), (h, i)
        vm = jax.vmap(lambda q, k, v: X.mosaic_attention(q[None], k[None], v[None])[0])(q, k, v)
        assert np.array_equal(bits(vm), full)
        assert np.array_equal(bits(X.mosaic_attention(q, k, v)), full)   # run to run


@gpu_only
@pytest.mark.parametrize("h", [128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_decode_equals_prefill(dtype, h):
    """Decode of token t (cache padded to another max_len, neighbours of other lengths in the batch)
    equals the full prefill's row t, for t on and across the KV block boundaries (128 keys at head
    dim 128, 64 at 256). Prefill masks the last blocks of a CTA, decode hardly any: same bits."""
    s = 700
    q, k, v = qkv(30, 2, s, s, 8, 4, h, dtype)
    full = bits(X.mosaic_attention(q, k, v, logits_soft_cap=50.0))
    max_len = 832
    pad = ((0, 0), (0, max_len - s), (0, 0), (0, 0))
    kc, vc = jnp.pad(k, pad), jnp.pad(v, pad)
    for t in (0, 63, 64, 65, 127, 128, 129, 511, 699):
        lengths = jnp.array([t + 1, min(s, t + 40)], jnp.int32)   # the neighbour is longer
        qd = jnp.stack([q[0, t:t + 1], q[1, lengths[1] - 1:lengths[1]]])
        d = bits(X.mosaic_decode_attention(qd, kc, vc, lengths, logits_soft_cap=50.0))
        assert np.array_equal(d[0, 0], full[0, t]), t
        assert np.array_equal(d[1, 0], full[1, int(lengths[1]) - 1]), t


def _jitted_forward(h, **kw):
    """``M.forward``'s output (soft cap 50), compiled once for a loop over positions: an eager
    call compiles the kernels anew every time."""
    return jax.jit(lambda q, k, v, p, l: M.forward(q, k, v, p, l, causal=True, sliding_window=None,
                                                   scale=h ** -0.5, soft_cap=50.0, **kw)[0])


@gpu_only
@pytest.mark.parametrize("h", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_split_order_decode_equals_prefill(dtype, h):
    """The opt-in key splits (``splits=True``; ``ATTN_SPLIT_K`` = 1024 keys): decode through one
    CTA per (row block, split) and the merge kernel equals the prefill's rows (merges inside its
    CTAs), for tokens on and across split boundaries, a cache padded past the length, a longer
    neighbour in the batch; the one-kernel decode (``split_parallel=False``) gives the same bits.
    Without splits decode gives other bits past the first split: the splits are in the order.
    (s23-1 / s24-1: 1 element by 1 bf16 ulp at some positions at head dims 64 / 128 while the
    merges' products and sums were left to the compiler; ``_rn`` since.)"""
    s, max_len = 2200, 2304
    q, k, v = qkv(31, 2, s, s, 8, 2, h, dtype)
    full = bits(_jitted_forward(h, splits=True)(q, k, v, K.default_q_positions(2, s, s),
                                                jnp.full((2,), s, jnp.int32)))
    pad = ((0, 0), (0, max_len - s), (0, 0), (0, 0))
    kc, vc = jnp.pad(k, pad), jnp.pad(v, pad)
    split, one_kernel, unsplit = (_jitted_forward(h, layout="packed", **kw) for kw in (
        dict(splits=True), dict(splits=True, split_parallel=False), dict(splits=False)))
    moved = 0
    for t in (5, 127, 128, 1022, 1023, 1024, 1025, 1535, 2047, 2048, 2049, 2199):
        lengths = jnp.array([t + 1, min(s, t + 300)], jnp.int32)
        qd = jnp.stack([q[0, t:t + 1], q[1, int(lengths[1]) - 1:int(lengths[1])]])
        args = (qd, kc, vc, lengths[:, None] - 1, lengths)
        d = bits(split(*args))
        assert np.array_equal(d[0, 0], full[0, t]), t
        assert np.array_equal(d[1, 0], full[1, int(lengths[1]) - 1]), t
        assert np.array_equal(bits(one_kernel(*args)), d), t
        moved += int(np.sum(bits(unsplit(*args)) != d))
    assert moved > 0


@gpu_only
def test_gpu_split_order_accuracy():
    """The key-split order against float64 (ran in s23-1 as the then-default, passed)."""
    for seed, (b, t, n, kh, h), lens in [(13, (1, 2600, 4, 2, 256), None),
                                         (14, (2, 2100, 4, 1, 128), [2100, 1500])]:
        q, k, v = qkv(seed, b, t, t, n, kh, h, jnp.bfloat16)
        lens = jnp.full((b,), t, jnp.int32) if lens is None else jnp.array(lens, jnp.int32)
        out = np.asarray(M.forward(q, k, v, K.default_q_positions(b, t, t), lens, causal=True,
                                   sliding_window=None, soft_cap=None, scale=h ** -0.5, splits=True)[0],
                         np.float64)
        ref = K.attention_f64_reference(q, k, v, kv_lengths=lens)
        assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < TOL[jnp.dtype(jnp.bfloat16)], seed


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_gradients(dtype):
    """Gradients through the Mosaic forward (Triton backward fed its lse): close to the Triton
    path's gradients, batch-invariant and run-to-run identical, bitwise."""
    from detjax import ops
    b, t, n, kh, h = 3, 300, 4, 2, 128
    q, k, v = qkv(80, b, t, t, n, kh, h, dtype)
    w = jnp.asarray(np.random.default_rng(81).standard_normal(q.shape), jnp.float32)
    kw = dict(sliding_window=100, logits_soft_cap=30.0)

    def grads(fn, q, k, v, w):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * w),
                                argnums=(0, 1, 2)))(q, k, v)

    got = grads(X.mosaic_attention, q, k, v, w)
    ref = grads(ops.attention, q, k, v, w)
    for a, e in zip(got, ref):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.max(np.abs(a - e)) / np.max(np.abs(e)) < 4 * TOL[jnp.dtype(dtype)]
    again = grads(X.mosaic_attention, q, k, v, w)
    for a, e in zip(got, again):
        assert np.array_equal(bits(a), bits(e))
    alone = grads(X.mosaic_attention, q[1:2], k[1:2], v[1:2], w[1:2])
    for a, e in zip(got, alone):
        assert np.array_equal(bits(a)[1], bits(e)[0])


@gpu_only
def test_gpu_chunked_prefill_and_empty_rows():
    s = 600
    q, k, v = qkv(40, 2, s, s, 4, 2, 128, jnp.bfloat16)
    full = bits(X.mosaic_attention(q, k, v, sliding_window=100))
    for c0, c1 in ((0, 1), (1, 130), (130, 600)):
        pos = jnp.broadcast_to(jnp.arange(c0, c1, dtype=jnp.int32), (2, c1 - c0))
        part = bits(X.mosaic_attention(q[:, c0:c1], k, v, q_positions=pos, sliding_window=100))
        assert np.array_equal(part, full[:, c0:c1]), (c0, c1)
    pos = jnp.full((2, 3), -5, jnp.int32)   # before every key: no valid key, exactly 0
    out = np.asarray(X.mosaic_attention(q[:, :3], k, v, q_positions=pos), np.float32)
    assert np.all(out == 0)


@gpu_only
def test_gpu_negative_control_xla_attention_changes_with_batch():
    """The same batch check on XLA's attention fails on the GPU (so the checks above have teeth):
    some row of a batch, or a prefix of it, differs from the same rows computed alone (the shape
    of ``test_fusion.py``'s control, which broke on the H200 in run s9-6, then two more)."""
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="xla"))
    differs = False
    for b, t, kh, h in ((16, 128, 4, 64), (16, 257, 2, 128), (5, 300, 4, 256)):
        q, k, v = qkv(50 + t, b, t, t, 8, kh, h, jnp.bfloat16)
        full = bits(f(q, k, v))
        differs |= any(not np.array_equal(full[i], bits(f(q[i:i + 1], k[i:i + 1], v[i:i + 1]))[0])
                       for i in (0, 3, b - 1))
        differs |= not np.array_equal(full[:3], bits(f(q[:3], k[:3], v[:3])))
    assert differs, "control: XLA attention unexpectedly batch-invariant at these shapes"
