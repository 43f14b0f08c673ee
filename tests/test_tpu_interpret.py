"""TPU kernels (pallas_kernels/tpu.py) run in Pallas' TPU interpret mode, race detection on.

Shapes are tiny: the TPU interpreter simulates every grid step. A cross-platform lowering test
checks that every kernel also lowers to a Mosaic ``tpu_custom_call`` (Mosaic's own compilation to
TPU code needs libtpu and a TPU, which CI does not have).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPE_IDS, DTYPES, TOL, assert_bitwise_equal, randn, rel_err
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


def mm(a, b, **kw):
    return tpu.matmul_kernel_call(a, b, backend=BE, **kw)


def rr(x, op, **kw):
    return tpu.row_reduce(x, op, backend=BE, **kw)


# ----------------------------------------------------------------------------------------------
# Matmul.

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matmul_batch_invariance_and_accuracy(rng, dtype):
    a, b = randn(rng, (1, 33, K), dtype), randn(rng, (1, K, N_COLS), dtype)
    full = mm(a, b)
    assert full.shape == (1, 33, N_COLS) and full.dtype == jnp.dtype(dtype)
    for m in (1, 7):
        assert_bitwise_equal(mm(a[:, :m], b), full[:, :m], f"prefix {m}")
    for i in (0, 20, 32):  # a row alone vs at several positions in the batch
        assert_bitwise_equal(mm(a[:, i:i + 1], b)[0, 0], full[0, i], f"row {i}")
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
    f = lambda v: rr(v, op, weight=w)
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
