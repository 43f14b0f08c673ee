"""TPU kernels (pallas_kernels/tpu.py, tpu_attention.py) run in Pallas' TPU interpret mode, race
detection on.

Shapes are tiny: the TPU interpreter simulates every grid step. A cross-platform lowering test
checks that every kernel also lowers to a Mosaic ``tpu_custom_call`` (Mosaic's own compilation to
TPU code needs libtpu and a TPU, which CI does not have).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (DTYPE_IDS, DTYPES, TOL, assert_bitwise_equal, bits, plain_attention, randn,
                      rel_err)
from pallas_kernels import backend as _backend
from pallas_kernels import tpu

BE = "tpu-interpret"
K = 300        # two 256-wide K tiles, the second partial
N_COLS = 70    # one partial 128-wide N tile
ROW_N = 1500   # two 1024-lane chunks, the second partial
ROW_TOL = {jnp.dtype(jnp.bfloat16): 8e-3, jnp.dtype(jnp.float16): 1.5e-3, jnp.dtype(jnp.float32): 1e-5}


@pytest.fixture(autouse=True)
def no_races():
    """Fresh simulated TPU state per test; fail if the race detector reported anything."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # where races live
    from jax.experimental.pallas import tpu as pltpu
    assert _backend.interpret_arg(BE).detect_races
    pltpu.reset_tpu_interpret_mode_state()
    yield
    races = getattr(ipc, "races", None)
    assert races is None or not races.races_found, "the TPU interpreter detected a data race"


# Called eagerly, a TPU-interpret kernel is traced and compiled again on every call, even for a
# shape it has seen; tests that call one several times with one shape jit it (jit and eager
# calls were checked to give the same bits for every row op and matmul dtype).
def mm(a, b, **kw):
    return tpu.matmul_kernel_call(a, b, backend=BE, **kw)


def rr(x, op, **kw):
    return tpu.row_reduce(x, op, backend=BE, **kw)


# ----------------------------------------------------------------------------------------------
# Matmul.

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matmul_batch_invariance_and_accuracy(rng, dtype):
    a, b = randn(rng, (1, 33, K), dtype), randn(rng, (1, K, N_COLS), dtype)
    mm_jit = jax.jit(mm)   # the single rows and prefix 1 share one compiled program (as below)
    full = mm_jit(a, b)
    assert full.shape == (1, 33, N_COLS) and full.dtype == jnp.dtype(dtype)
    for m in (1, 7):
        assert_bitwise_equal(mm_jit(a[:, :m], b), full[:, :m], f"prefix {m}")
    for i in (0, 20, 32):  # a row alone vs at several positions in the batch
        assert_bitwise_equal(mm_jit(a[:, i:i + 1], b)[0, 0], full[0, i], f"row {i}")
    ref = np.asarray(a[0].astype(jnp.float32), np.float64) @ np.asarray(b[0].astype(jnp.float32), np.float64)
    tol = TOL[jnp.dtype(dtype)] if dtype != jnp.float32 else 2e-6
    assert rel_err(full[0], ref) < tol


def test_matmul_shared_weight_batch_vmap_run_to_run(rng):
    a, b = randn(rng, (3, 7, K), jnp.bfloat16), randn(rng, (1, K, N_COLS), jnp.bfloat16)
    full = mm(a, b)
    assert_bitwise_equal(mm(a[1:2], b)[0], full[1], "batch element alone")
    f = lambda r: mm(r[None], b)[0]
    assert_bitwise_equal(jax.vmap(f)(a)[2], f(a[2]), "vmap")
    g = jax.jit(lambda a, b: mm(a, b))
    assert_bitwise_equal(g(a, b), g(a, b), "run-to-run")
    assert_bitwise_equal(g(a, b), full, "jit vs eager")


def test_matmul_batched_b_and_transpose(rng):
    a, b = randn(rng, (2, 7, K), jnp.float32), randn(rng, (2, N_COLS, K), jnp.float32)
    out = mm(a, b, transpose_b=True)
    ref = np.einsum("bmk,bnk->bmn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert rel_err(out, ref) < 2e-6
    assert_bitwise_equal(mm(a[1:2, 3:4], b[1:2], transpose_b=True)[0, 0], out[1, 3], "row alone")


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_zero_extension_k(rng, transpose_b):
    a = randn(rng, (1, 5, K), jnp.float32)
    b = randn(rng, (1, N_COLS, K) if transpose_b else (1, K, N_COLS), jnp.float32)
    ref = mm(a, b, transpose_b=transpose_b)
    for extra in (1, 212, 400):  # inside the last tile, exactly to its end, whole extra tiles
        az = jnp.pad(a, ((0, 0), (0, 0), (0, extra)))
        bz = jnp.pad(b, ((0, 0), (0, 0), (0, extra)) if transpose_b else ((0, 0), (0, extra), (0, 0)))
        assert_bitwise_equal(mm(az, bz, transpose_b=transpose_b), ref, f"K extended by {extra}")


def test_matmul_out_dtype_and_rejections(rng):
    a, b = randn(rng, (1, 3, 20), jnp.bfloat16), randn(rng, (1, 20, 5), jnp.bfloat16)
    assert mm(a, b, out_dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="tf32"):
        mm(a, b, precision="tf32")
    with pytest.raises(ValueError, match="config must be None"):
        mm(a, b, config=object())
    with pytest.raises(ValueError, match="runs only on backends"):
        tpu.matmul_kernel_call(a, b, backend="interpret")


# ----------------------------------------------------------------------------------------------
# Row reductions.

def _np_softmax_parts(x):
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    return m, e, e.sum(-1, keepdims=True)


def _ref(op, x, w=None, eps=1e-6, offset=1.0):
    if op == "sum":
        return x.sum(-1)
    if op == "mean":
        return x.mean(-1)
    if op == "max":
        return x.max(-1)
    if op == "rms_norm":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (offset + w)
    m, e, s = _np_softmax_parts(x)
    if op == "logsumexp":
        return (m + np.log(s))[:, 0]
    if op == "softmax":
        return e / s
    return (x - m) - np.log(s)


@pytest.mark.parametrize("op", tpu.OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_batch_invariance_and_accuracy(rng, op, dtype):
    x = randn(rng, (33, ROW_N), dtype, 2.0)
    w = randn(rng, (ROW_N,), dtype, 0.1) if op == "rms_norm" else None
    # jitted, so the three single rows share one compiled program (called eagerly, every call
    # traced and compiled the kernel again; the bits are the same either way)
    f = jax.jit(lambda v: rr(v, op, weight=w))
    full = f(x)
    assert full.dtype == jnp.dtype(dtype)
    assert full.shape == ((33, ROW_N) if op in ("softmax", "log_softmax", "rms_norm") else (33,))
    # M in {1, 7, 33}: prefixes, and single rows at several positions (row block of 8 or 16 rows).
    assert_bitwise_equal(f(x[:7]), full[:7], f"{op} prefix 7")
    for i in (0, 17, 32):
        assert_bitwise_equal(f(x[i:i + 1])[0], full[i], f"{op} row {i} alone")
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w64 = None if w is None else np.asarray(w.astype(jnp.float32), np.float64)
    assert rel_err(full, _ref(op, x64, w64)) < ROW_TOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("op", ["sum", "softmax", "rms_norm"])
def test_rows_vmap_and_run_to_run(rng, op):
    x = randn(rng, (3, 5, ROW_N), jnp.float32)
    w = randn(rng, (ROW_N,), jnp.float32, 0.1) if op == "rms_norm" else None
    f = lambda v: rr(v, op, weight=w)
    assert_bitwise_equal(jax.vmap(f)(x)[1], f(x[1]), f"{op} vmap")
    g = jax.jit(f)
    assert_bitwise_equal(g(x[0]), g(x[0]), f"{op} run-to-run")


@pytest.mark.parametrize("op", ["sum", "max", "logsumexp", "softmax", "log_softmax"])
def test_rows_zero_extension(rng, op):
    """A row extended with identities: 0 for sum, -inf (a masked tail) for the max/softmax family."""
    x = randn(rng, (4, 1000), jnp.float32, 3.0)
    fill = 0.0 if op == "sum" else -jnp.inf
    ref = rr(x, op)
    for extra in (24, 25, 1048):  # to the chunk's end, past it, a whole extra chunk and more
        out = rr(jnp.pad(x, ((0, 0), (0, extra)), constant_values=fill), op)
        if op in ("softmax", "log_softmax"):
            out = out[:, :1000]
        assert_bitwise_equal(out, ref, f"{op} extended by {extra}")


def test_rows_special_values():
    x = jnp.asarray([[1.0, jnp.nan, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]], jnp.float32)
    assert np.isnan(np.asarray(rr(x, "max"))[0])
    assert np.asarray(rr(x, "max"))[1] == -np.inf
    assert np.asarray(rr(x, "logsumexp"))[1] == -np.inf  # like jax.nn.logsumexp of an empty row


# ----------------------------------------------------------------------------------------------
# Block-shape rule and Mosaic lowering.

@pytest.mark.parametrize("block, array, dtype, what", [
    ((8, 100), (64, 1000), jnp.float32, "dim -1 is 100"),
    ((4, 128), (64, 1000), jnp.float32, "dim -2 is 4"),
    ((8, 128), (64, 1024), jnp.bfloat16, "multiple of 16 \\(for bfloat16\\)"),
    ((None, 8, 64), (2, 64, 1000), jnp.float32, "dim -1 is 64"),
    ((2048,), (4096,), jnp.float32, None),
    ((100,), (4096,), jnp.float32, "dim -1 is 100"),
    ((16, 256), (8, 256), jnp.float32, "does not fit"),
    ((8, 128), (64, 128, 1), jnp.float32, "rank"),
])
def test_block_shape_checker_rejects(block, array, dtype, what):
    if what is None:
        tpu.check_tpu_block_shape(block, array, dtype)
        return
    with pytest.raises(ValueError, match="my_kernel") as e:
        tpu.check_tpu_block_shape(block, array, dtype, kernel="my_kernel")
    assert str(tuple(block)) in str(e.value) and str(tuple(array)) in str(e.value)
    assert e.match(what)


@pytest.mark.parametrize("block, array, dtype", [
    ((8, 128), (64, 1000), jnp.float32),
    ((16, 256), (64, 1024), jnp.bfloat16),
    ((3, 1000), (3, 1000), jnp.bfloat16),      # equal to the full dims
    ((None, 128, 256), (4, 256, 512), jnp.float32),
    ((1, 2048), (1, 2048), jnp.float16),
])
def test_block_shape_checker_accepts(block, array, dtype):
    tpu.check_tpu_block_shape(block, array, dtype)


def test_lowers_to_mosaic(monkeypatch):
    """Every kernel lowers (cross-platform, on this CPU) to a Mosaic TPU custom call."""
    monkeypatch.setattr(_backend, "_platform", lambda: "tpu")
    cases = [
        (lambda a, b: tpu.matmul_kernel_call(a, b, backend="tpu"),
         [(2, 33, K, jnp.bfloat16), (1, K, N_COLS, jnp.bfloat16)]),
        (lambda a, b: tpu.matmul_kernel_call(a, b, transpose_b=True, backend="tpu"),
         [(1, 9, K, jnp.float32), (1, N_COLS, K, jnp.float32)]),
    ]
    for op in tpu.OPS:
        cases.append((lambda x, w, op=op: tpu.row_reduce(x, op, weight=w if op == "rms_norm" else None,
                                                         backend="tpu"),
                      [(7, ROW_N, jnp.bfloat16), (ROW_N, jnp.bfloat16)]))
    for fn, shapes in cases:
        args = [jax.ShapeDtypeStruct(s[:-1], s[-1]) for s in shapes]
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text




# ----------------------------------------------------------------------------------------------
# Attention (pallas_kernels/tpu_attention.py) through detjax.ops: prefill, decode, backward.
#
# Head dim 64 (zero-padded to 128 in the wrapper). Every distinct shape / option set costs an
# interpret-mode compile (~2-3 s here), so the tests share shapes: family "A" (float32, B=2, T=S=20,
# N=4 query heads on K=2 KV heads) serves the mask, non-finite and vmap tests.

from detjax import ops  # noqa: E402
from pallas_kernels import attention as attn_k  # noqa: E402
from pallas_kernels import tpu_attention  # noqa: E402
from pallas_kernels.order import ATTN_SPLIT_K  # noqa: E402

BK = tpu_attention.TPU_ATTN_BLOCK_K   # 128-key blocks
assert (BK, ATTN_SPLIT_K) == (128, 1024)  # the boundaries the decode tests straddle


def attn(q, k, v, **kw):
    return ops.attention(q, k, v, backend=BE, **kw)


def dec(q, kc, vc, lengths, **kw):
    return ops.decode_attention(q, kc, vc, jnp.asarray(lengths, jnp.int32), backend=BE, **kw)


def qkv(rng, b, t, s, n, kh, dtype, h=64):
    return (randn(rng, (b, t, n, h), dtype), randn(rng, (b, s, kh, h), dtype),
            randn(rng, (b, s, kh, h), dtype))


def qkv_a(rng):
    return qkv(rng, 2, 20, 20, 4, 2, jnp.float32)


@pytest.mark.parametrize("dtype, n, kh", [(jnp.float16, 4, 4), (jnp.float32, 4, 1)],
                         ids=["f16-mha", "f32-mqa"])
def test_attention_accuracy(rng, dtype, n, kh):
    """vs the float64 reference; S = 150 (two 128-key blocks, the second partial), ragged lengths.
    (bf16 accuracy: test_decode_equals_prefill_bf16_gqa; GQA f32: test_attention_masks.)"""
    q, k, v = qkv(rng, 2, 20, 150, n, kh, dtype)
    lens = jnp.array([150, 90], jnp.int32)
    out = attn(q, k, v, kv_lengths=lens)
    assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape
    assert rel_err(out, attn_k.attention_f64_reference(q, k, v, kv_lengths=lens)) < TOL[jnp.dtype(dtype)]


def test_attention_batch_invariance_and_run_to_run(rng):
    """A sequence alone vs at positions 0, 1, 2 of a batch with ragged neighbours (float32, so an
    order change would show in the bits; T = S = 150, 2 query heads on 1 KV head: 5 q blocks of
    64 rows, 2 KV blocks), and run-to-run."""
    t = 150
    q, k, v = qkv(rng, 1, t, t, 2, 1, jnp.float32)
    alone = attn(q, k, v, kv_lengths=jnp.array([140]))
    nq, nk, nv = qkv(rng, 3, t, t, 2, 1, jnp.float32)
    for pos, lens in ((0, [140, 7, 0]), (1, [150, 140, 129]), (2, [3, 128, 140])):
        bq, bk, bv = (x.at[pos].set(y[0]) for x, y in ((nq, q), (nk, k), (nv, v)))
        out = attn(bq, bk, bv, kv_lengths=jnp.array(lens))
        assert_bitwise_equal(out[pos], alone[0], f"sequence at batch position {pos}")
    assert_bitwise_equal(attn(bq, bk, bv, kv_lengths=jnp.array(lens)), out, "run-to-run")


def test_attention_vmap_invariance(rng):
    q, k, v = (jnp.stack([x, y]) for x, y in zip(qkv_a(rng), qkv_a(rng)))  # 2 items of family A
    lens = jnp.array([[20, 5], [11, 20]], jnp.int32)
    mapped = jax.vmap(lambda a, b, c, l: attn(a, b, c, kv_lengths=l))(q, k, v, lens)
    mapped_dec = jax.vmap(lambda a, b, c, l: dec(a, b, c, l))(q[:, :, 4:5], k, v, lens)
    for i in range(2):
        assert_bitwise_equal(mapped[i], attn(q[i], k[i], v[i], kv_lengths=lens[i]), f"vmap {i}")
        assert_bitwise_equal(mapped_dec[i], dec(q[i, :, 4:5], k[i], v[i], lens[i]), f"vmap dec {i}")


def test_decode_equals_prefill_across_blocks_and_splits(rng):
    """Decode at cache lengths on and across the 128-key block and 1024-key split boundaries, all in
    one ragged batch, from a cache of max_len 1300 (not a multiple of 128; NaN beyond the lengths)
    = the rows of the full prefill (S = 1100); also with a window (blocks and whole splits before
    it are skipped; 330 keys, so a q block's first block is not its rows') and a soft cap, whose
    prefill is checked against float64 and, bitwise, against the plain-JAX reference of the
    documented order (so the 1024-key split merges anchored at key 0 are checked, not only
    decode = prefill, which share one kernel)."""
    s, max_len = 1100, 1300
    q, k, v = qkv(rng, 1, s, s, 1, 1, jnp.float32)
    lengths = np.array([1, 127, 128, 129, 1023, 1024, 1025, 1100])
    pad = ((0, 0), (0, max_len - s), (0, 0), (0, 0))
    kc, vc = (jnp.pad(jnp.broadcast_to(x, (len(lengths),) + x.shape[1:]), pad, constant_values=np.nan)
              for x in (k, v))
    qd = jnp.stack([q[0, L - 1:L] for L in lengths])
    for opts in ({}, dict(sliding_window=330, logits_soft_cap=20.0)):
        full = attn(q, k, v, **opts)
        if opts:
            assert rel_err(full, attn_k.attention_f64_reference(q, k, v, **opts)) < TOL[jnp.dtype(jnp.float32)]
            assert_bitwise_equal(full, tpu_attention.attention_reference(q, k, v, **opts), "reference")
        full = np.asarray(full)[0]
        out = dec(qd, kc, vc, lengths, **opts)
        for b, L in enumerate(lengths):
            assert_bitwise_equal(out[b, 0], full[L - 1], f"decode L={L} {opts}")


def test_decode_equals_prefill_bf16_gqa(rng):
    """bf16, 4 query heads on 2 KV heads: 3 tokens per sequence decoded from a NaN-padded cache of
    256 with ragged lengths = the prefill rows; the prefill is within the bf16 tolerance and has the
    bits of the plain-JAX reference of the documented order."""
    s = 140
    q, k, v = qkv(rng, 3, s, s, 4, 2, jnp.bfloat16)
    full = attn(q, k, v)
    assert rel_err(full, attn_k.attention_f64_reference(q, k, v)) < TOL[jnp.dtype(jnp.bfloat16)]
    assert_bitwise_equal(full, tpu_attention.attention_reference(q, k, v), "reference")
    lengths, tq = [37, 128, 131], 3
    pad = ((0, 0), (0, 256 - s), (0, 0), (0, 0))
    kc, vc = (jnp.pad(x, pad, constant_values=np.nan) for x in (k, v))
    out = dec(jnp.stack([q[b, L - tq:L] for b, L in enumerate(lengths)]), kc, vc, lengths)
    for b, L in enumerate(lengths):
        assert_bitwise_equal(out[b], full[b, L - tq:L], f"decode b={b} L={L}")


def test_attention_masks(rng):
    """Causal (GQA, f32 accuracy); non-causal with a symmetric window, soft cap and scale vs float64;
    a causal window of 1 returns exactly the value vectors. (Causal window + soft cap:
    test_decode_equals_prefill_across_blocks_and_splits.)"""
    q, k, v = qkv_a(rng)
    base = attn(q, k, v)
    assert rel_err(base, attn_k.attention_f64_reference(q, k, v)) < TOL[jnp.dtype(jnp.float32)]
    assert_bitwise_equal(attn(q, k, v, sliding_window=1), jnp.repeat(v, 2, axis=2), "window 1 = v")
    opts = dict(causal=False, sliding_window=4, logits_soft_cap=2.0, scale=0.3)
    out = attn(q, k, v, **opts)
    assert rel_err(out, attn_k.attention_f64_reference(q, k, v, **opts)) < TOL[jnp.dtype(jnp.float32)]
    for flip in ("causal", "sliding_window", "logits_soft_cap"):  # each option matters here
        other = dict(opts, **{flip: {"causal": True, "sliding_window": None, "logits_soft_cap": None}[flip]})
        assert rel_err(out, attn_k.attention_f64_reference(q, k, v, **other)) > 1e-3, flip


def test_attention_empty_rows_and_garbage(rng):
    """Padded / empty rows (no key, negative positions, length 0) are exactly 0; NaN/inf at or
    beyond the lengths never leak."""
    t, s = 9, 30
    q, k, v = qkv(rng, 3, t, s, 4, 2, jnp.bfloat16)
    lengths = jnp.array([0, 30, 12], jnp.int32)
    pos = jnp.array([np.arange(9), np.arange(-4, 5), np.arange(20, 29)], jnp.int32)
    out = np.asarray(attn(q, k, v, q_positions=pos, kv_lengths=lengths), np.float32)
    assert np.all(out[0] == 0) and np.all(out[1, :4] == 0)
    assert np.all(np.any(out[1, 4:] != 0, axis=-1)) and not np.any(np.isnan(out))
    ref = attn_k.attention_f64_reference(q, k, v, q_positions=pos, kv_lengths=lengths)
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.bfloat16)]
    bad = np.arange(s)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
    out2 = attn(q, jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.inf, v), q_positions=pos,
                kv_lengths=lengths)
    assert_bitwise_equal(out2, out.astype(jnp.bfloat16), "garbage beyond kv_lengths")


def test_attention_non_finite_stays_in_the_row_interval(rng):
    """A NaN / inf in a future (masked) value does not reach earlier rows of its block, so decode =
    prefill holds for it; a NaN query row gives NaN in that row and head only (not 0)."""
    q, k, v = qkv_a(rng)
    clean = np.asarray(attn(q, k, v))
    vb = v.at[0, 5, 0, 0].set(jnp.nan).at[0, 9, 0, 3].set(jnp.inf)
    out = np.asarray(attn(q, k, vb))
    assert_bitwise_equal(out[:, :5], clean[:, :5], "rows before the NaN value")
    assert_bitwise_equal(out[1], clean[1], "the other sequence")
    assert np.all(np.isnan(out[0, 5:, :2, 0])) and np.all(out[0, 9:, :2, 3] == np.inf)
    assert np.all(np.isfinite(out[0, 5:9, :2, 1:])) and np.all(np.isfinite(out[0, :, 2:]))
    qd = jnp.stack([q[0, 2:3], q[1, 19:20]])
    d = dec(qd, k, vb, [3, 20])  # length 3: keys 0..2 only, the NaN at key 5 is never read
    assert_bitwise_equal(d[:, 0], np.stack([out[0, 2], out[1, 19]]), "decode = prefill")
    outq = np.array(attn(q.at[0, 10, 1, 0].set(jnp.nan), k, v))
    assert np.all(np.isnan(outq[0, 10, 1])) and np.all(np.isfinite(outq[0, 10, 0]))
    outq[0, 10, 1] = clean[0, 10, 1]
    assert_bitwise_equal(outq, clean, "rows other than the NaN query")


_plain_attention = plain_attention   # tests/conftest.py


def test_attention_gradients(rng):
    """The custom_vjp backward kernels (f32, GQA, window, soft cap, ragged lengths, 2 KV blocks):
    close to autodiff of plain attention, bitwise run-to-run, and each sequence's gradients bitwise
    the same at batch position 0 or 1."""
    t = 140
    q, k, v = qkv(rng, 2, t, t, 4, 2, jnp.float32)
    w = randn(rng, (2, t, 4, 64), jnp.float32)
    opts = dict(sliding_window=100, logits_soft_cap=20.0)

    def loss(fn, **kw):
        return lambda q, k, v, w, lens: jnp.sum(fn(q, k, v, kv_lengths=lens, **opts, **kw) * w)

    grads = jax.jit(jax.grad(loss(ops.attention, backend=BE), argnums=(0, 1, 2)))
    lens = jnp.array([140, 90], jnp.int32)
    g1, g2 = grads(q, k, v, w, lens), grads(q, k, v, w, lens)
    gref = jax.jit(jax.grad(loss(_plain_attention), argnums=(0, 1, 2)))(q, k, v, w, lens)
    swapped = grads(*(x[::-1] for x in (q, k, v, w, lens)))
    for a, b, r, c, name in zip(g1, g2, gref, swapped, "qkv"):
        assert_bitwise_equal(a, b, f"d{name} run-to-run")
        assert rel_err(a, np.asarray(r, np.float64)) < 2e-5, name
        assert_bitwise_equal(c[::-1], a, f"d{name} with the batch order swapped")
    assert np.all(np.asarray(g1[1])[1, 90:] == 0)  # keys past the length get no gradient


def test_attention_block_shape_errors(rng, monkeypatch):
    """A block shape that breaks Mosaic's tiling rule is rejected, naming the kernel and the rule."""
    q, k, v = qkv(rng, 1, 4, 8, 4, 2, jnp.bfloat16)
    pos, lens = attn_k.default_q_positions(1, 4, 8), jnp.array([8], jnp.int32)
    cfg = attn_k.AttnConfig(0.125, None, BE)
    run = lambda q, k, v: tpu_attention.attention(q, k, v, pos, lens, cfg=cfg, causal=True,
                                                  sliding_window=None)
    monkeypatch.setattr(tpu_attention, "BLOCK_Q", 8)   # 8 rows: enough for f32, not packed bf16
    with pytest.raises(ValueError, match="detjax_tpu_attention_fwd.*multiple of 16 \\(for bfloat16\\)"):
        run(q, k, v)
    monkeypatch.undo()
    monkeypatch.setattr(tpu_attention, "LANES", 64)    # row-interval tiles narrower than a vreg
    with pytest.raises(ValueError, match="detjax_tpu_attention_fwd.*dim -1 is 64"):
        run(q, k, v)


def test_attention_lowers_to_mosaic(monkeypatch):
    """Prefill (forward, and both backward kernels) and decode lower to Mosaic TPU custom calls."""
    monkeypatch.setattr(_backend, "_platform", lambda: "tpu")
    S = jax.ShapeDtypeStruct
    for dt in (jnp.bfloat16, jnp.float32):
        q, kv = S((2, 20, 4, 64), dt), S((2, 300, 2, 64), dt)
        f = lambda q, k, v: ops.attention(q, k, v, sliding_window=50, logits_soft_cap=30.0, backend="tpu")
        g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
        d = lambda q, k, v, l: ops.decode_attention(q, k, v, l, backend="tpu")
        for fn, args, calls in ((f, (q, kv, kv), 1), (g, (q, kv, kv), 3),
                                (d, (S((2, 1, 4, 64), dt), kv, kv, S((2,), jnp.int32)), 1)):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
            assert text.count("tpu_custom_call") == calls
