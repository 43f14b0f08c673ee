"""Fixed-order cumulative ops (detjax.ops._scan / pallas_kernels.scan), CPU interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax.ops._scan import cumlogsumexp, cummax, cummin, cumsum, cumsum_reference
from pallas_kernels.scan import SCAN_CHUNK

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def same(a, b):
    return np.array_equal(bits(a), bits(b))


def rnd(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cumsum_batch_invariance(dtype):
    n = 33 if dtype == jnp.float32 else 9
    x = rnd((n, 2 * SCAN_CHUNK + 37), dtype)
    y = jax.jit(cumsum)(x)
    for i in (0, 6, n - 1):
        assert same(jax.jit(cumsum)(x[i:i + 1])[0], y[i])
    assert same(jax.jit(cumsum)(x[:7]), y[:7])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cumsum_prefix_property(dtype):
    x = rnd((4, 3 * SCAN_CHUNK + 5), dtype, 1)
    y = cumsum(x)
    for n in (1, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 1, 2 * SCAN_CHUNK + 77):
        assert same(cumsum(x[:, :n]), y[:, :n]), n


def test_cumsum_reverse_suffix_property():
    x = rnd((3, 2 * SCAN_CHUNK + 9), seed=2)
    y = cumsum(x, reverse=True)
    assert same(cumsum(x[:, -300:], reverse=True), y[:, -300:])
    np.testing.assert_allclose(y, jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)])
def test_cumsum_accuracy_vs_f64(dtype, tol):
    x = rnd((5, 1000), dtype, 3)
    ref = np.cumsum(np.asarray(x.astype(jnp.float32), np.float64), axis=1)
    y = np.asarray(cumsum(x).astype(jnp.float32), np.float64)
    scale = np.cumsum(np.abs(np.asarray(x.astype(jnp.float32), np.float64)), axis=1) + 1
    assert np.max(np.abs(y - ref) / scale) < tol


def test_cumsum_matches_reference_bits_and_axes():
    x = rnd((3, 5, 300), seed=4)
    for ax in (0, 1, 2, -1):
        if jax.default_backend() != "gpu":  # the reference restates the interpret-mode bits
            assert same(cumsum(x, ax), cumsum_reference(x, ax))
        np.testing.assert_allclose(cumsum(x, ax), jnp.cumsum(x, ax), rtol=1e-5, atol=1e-4)


def test_cumsum_run_to_run_and_jit_vmap():
    x = rnd((6, 400), seed=5)
    y = cumsum(x)
    assert same(jax.jit(cumsum)(x), y)
    assert same(jax.vmap(cumsum)(x), y)
    assert same(cumsum(x), y)


def test_cumsum_grad():
    x = rnd((4, 300), seed=6)
    w = rnd((4, 300), seed=7)
    g = jax.grad(lambda v: jnp.sum(cumsum(v) * w))(x)
    gr = jax.grad(lambda v: jnp.sum(jnp.cumsum(v, axis=-1) * w))(x)
    np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fn,ref", [(cummax, jax.lax.cummax), (cummin, jax.lax.cummin),
                                    (cumlogsumexp, jax.lax.cumlogsumexp)])
@pytest.mark.parametrize("reverse", [False, True])
def test_other_scans(fn, ref, reverse):
    x = rnd((9, SCAN_CHUNK + 50), seed=8)
    y = fn(x, reverse=reverse)
    np.testing.assert_allclose(y, ref(x, axis=1, reverse=reverse), rtol=1e-5, atol=1e-5)
    assert same(fn(x[3:4], reverse=reverse)[0], y[3])
    if not reverse:
        assert same(fn(x[:, :100]), y[:, :100])
    w = rnd(x.shape, seed=9)
    g = jax.grad(lambda v: jnp.sum(fn(v, reverse=reverse) * w))(x)
    gr = jax.grad(lambda v: jnp.sum(ref(v, axis=1, reverse=reverse) * w))(x)
    np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(TypeError):
        cumsum(jnp.arange(4))
    with pytest.raises(ValueError):
        cumsum(jnp.ones((2, 3)), axis=2)
    assert cumsum(jnp.ones((0, 3))).shape == (0, 3)
