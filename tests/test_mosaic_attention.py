"""detjax.experimental.mosaic_attention: the Mosaic GPU attention kernel (pallas_kernels/attention_mgpu.py).

On CPU: argument errors, the CTA block ranges, and that every configuration *lowers* for CUDA
(Pallas -> Mosaic GPU, run on this machine: shapes, layouts and the kernel's Python all checked).
The kernel itself runs only on a Hopper GPU; the GPU tests below check what the probe runs s10-6 and
s10-7 (results/README.md, session 10) showed for the same kernel: accuracy against float64, batch and
vmap invariance, decode = prefill, chunked prefill = full prefill, empty rows, all bitwise. They
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
    if not GPU:   # arguments are checked first, then the device
        with pytest.raises(NotImplementedError, match="Hopper"):
            X.mosaic_attention(q, k, v)


def test_block_ranges_match_brute_force():
    rng = np.random.default_rng(3)
    b, kh, rp = 2, 3, 256
    lo = rng.integers(0, 500, (b, kh, rp))
    hi = lo + rng.integers(-50, 300, (b, kh, rp))
    hi[0, 0, :128] = lo[0, 0, :128]          # a CTA whose rows are all empty
    got = np.asarray(M.block_ranges(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)))
    for i in range(b):
        for h in range(kh):
            for c in range(rp // 128):
                rows = slice(c * 128, (c + 1) * 128)
                ne = hi[i, h, rows] > lo[i, h, rows]
                if not ne.any():
                    assert tuple(got[i, h, c]) == (0, 0)
                    continue
                blocks = {j for lo_, hi_ in zip(lo[i, h, rows][ne], hi[i, h, rows][ne])
                          for j in range(lo_ // 64, -(-hi_ // 64))}
                assert tuple(got[i, h, c]) == (min(blocks), max(blocks) + 1)


LOWER_CASES = {
    "bf16 H128 causal GQA": (jnp.bfloat16, 2, 300, 300, 8, 2, 128, {}),
    "f16 H256 window cap lengths": (jnp.float16, 2, 200, 200, 4, 4, 256,
                                    dict(sliding_window=50, soft_cap=30.0, lengths=True)),
    "bf16 H64 decode 1 token": (jnp.bfloat16, 3, 1, 1000, 8, 1, 64, dict(decode=True)),
    "bf16 H40 non-causal": (jnp.bfloat16, 1, 70, 70, 2, 1, 40, dict(causal=False)),
}


@pytest.mark.parametrize("name", list(LOWER_CASES))
def test_lowers_for_cuda(name):
    """Pallas -> Mosaic GPU lowering of the whole forward (packing, block ranges, kernel) for
    CUDA, on whatever machine runs the tests."""
    dt, b, t, s, n, kh, h, opt = LOWER_CASES[name]
    q, k, v = qkv(1, b, t, s, n, kh, h, dt)
    lengths = jnp.full((b,), s, jnp.int32) if not opt.get("lengths") else jnp.array([s, s // 2], jnp.int32)
    pos = (lengths[:, None] - 1) if opt.get("decode") else K.default_q_positions(b, t, s)
    f = lambda q, k, v, p, l: X._packed_forward(  # noqa: E731
        q, k, v, p, l, causal=opt.get("causal", True), sliding_window=opt.get("sliding_window"),
        soft_cap=opt.get("soft_cap"), scale=h ** -0.5)
    text = jax.jit(f).trace(q, k, v, pos, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "wgmma" in text


def test_not_differentiable():
    q, k, v = qkv(2, 1, 8, 8, 2, 1, 64, jnp.bfloat16)
    pos, lens = K.default_q_positions(1, 8, 8), jnp.array([8], jnp.int32)

    def loss(q):
        return X._forward(q, k, v, pos, lens, True, None, None, 0.125).astype(jnp.float32).sum()

    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.jit(jax.grad(loss)).trace(q)


# ------------------------------------------------------------------------------------------------
# GPU (Hopper): the guarantees, bitwise


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_accuracy(dtype):
    for seed, (b, t, n, kh, h), kw in [(10, (2, 333, 8, 2, 128), {}),
                                       (11, (3, 200, 4, 4, 256),
                                        dict(sliding_window=64, logits_soft_cap=30.0,
                                             kv_lengths=jnp.array([200, 150, 70], jnp.int32)))]:
        q, k, v = qkv(seed, b, t, t, n, kh, h, dtype)
        out = np.asarray(X.mosaic_attention(q, k, v, **kw), np.float64)
        ref = K.attention_f64_reference(q, k, v, **kw)
        err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
        assert err < TOL[jnp.dtype(dtype)], (seed, err)


@gpu_only
def test_gpu_batch_and_vmap_invariance():
    q, k, v = qkv(20, 6, 257, 257, 8, 2, 128, jnp.bfloat16)
    full = bits(X.mosaic_attention(q, k, v))
    for i in (0, 3, 5):
        assert np.array_equal(full[i], bits(X.mosaic_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]))[0]), i
    vm = jax.vmap(lambda q, k, v: X.mosaic_attention(q[None], k[None], v[None])[0])(q, k, v)
    assert np.array_equal(bits(vm), full)
    assert np.array_equal(bits(X.mosaic_attention(q, k, v)), full)   # run to run


@gpu_only
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_decode_equals_prefill(dtype):
    """Decode of token t (cache padded to another max_len, neighbours of other lengths in the batch)
    equals the full prefill's row t, for t on and across the 64-key block boundaries."""
    s = 700
    q, k, v = qkv(30, 2, s, s, 8, 4, 256, dtype)
    full = bits(X.mosaic_attention(q, k, v, logits_soft_cap=50.0))
    max_len = 832
    pad = ((0, 0), (0, max_len - s), (0, 0), (0, 0))
    kc, vc = jnp.pad(k, pad), jnp.pad(v, pad)
    for t in (0, 63, 64, 65, 128, 511, 699):
        lengths = jnp.array([t + 1, min(s, t + 40)], jnp.int32)   # the neighbour is longer
        qd = jnp.stack([q[0, t:t + 1], q[1, lengths[1] - 1:lengths[1]]])
        d = bits(X.mosaic_decode_attention(qd, kc, vc, lengths, logits_soft_cap=50.0))
        assert np.array_equal(d[0, 0], full[0, t]), t
        assert np.array_equal(d[1, 0], full[1, int(lengths[1]) - 1]), t


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
