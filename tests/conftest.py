"""Shared test helpers: bitwise comparison, fresh random inputs, device detection."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

ON_GPU = jax.default_backend() == "gpu"

# Hypothesis example counts of the property tests (test_matmul.py, test_reductions.py; the fuzzer
# in scripts/reliability.py sets its own). Every example draws new shapes, i.e. new compiled
# programs, ~0.5 s each in CPU interpret mode. "full" (12 per test) is the default on a GPU,
# "cpu" (6) without one; DETJAX_HYPOTHESIS_PROFILE=full (or =cpu) picks one explicitly.
settings.register_profile("full", max_examples=12, deadline=None)
settings.register_profile("cpu", max_examples=6, deadline=None)
settings.load_profile(os.environ.get("DETJAX_HYPOTHESIS_PROFILE", "full" if ON_GPU else "cpu"))
DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
DTYPE_IDS = ["bf16", "f16", "f32"]

# Relative Frobenius error against a float64 reference, per input/output dtype: the output is rounded
# once to its dtype (bf16: 2^-9 relative, f16: 2^-12), f32 accumulates in f32.
TOL = {jnp.dtype(jnp.bfloat16): 8e-3, jnp.dtype(jnp.float16): 1.5e-3, jnp.dtype(jnp.float32): 2e-6}

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled Pallas kernels)")


def bits(x) -> np.ndarray:
    """The raw bit patterns of an array (so -0.0 != +0.0 and NaN payloads count)."""
    a = np.asarray(x)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def assert_bitwise_equal(a, b, what=""):
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtypes {a.dtype} vs {b.dtype}"
    diff = bits(a) != bits(b)
    if diff.any():
        idx = tuple(int(i[0]) for i in np.nonzero(diff))
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} elements differ bitwise; "
                             f"first at {idx}: {a[idx]!r} vs {b[idx]!r}")


def rel_err(x, ref, floor: float = 1e-30) -> float:
    """Normwise relative error of ``x`` against ``ref``, the norm of ``ref`` floored at ``floor``."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("DETJAX_TEST_SEED", secrets.randbits(32)))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


def randn(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def script_module(stem: str):
    """``scripts/<stem>.py`` imported as a module (once per process)."""
    name = f"detjax_script_{stem}"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def reliability_module():
    """``scripts/reliability.py`` (fuzzing, stress, bad-input table), imported once per process."""
    return script_module("reliability")


def plain_attention(q, k, v, *, kv_lengths, causal=True, sliding_window=None, logits_soft_cap=None):
    """Differentiable float32 attention (XLA, highest precision) with the kernels' masks: the
    yardstick for attention gradients (GPU/interpret and TPU tests)."""
    from pallas_kernels import attention as K
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    lo, hi = K.row_bounds(K.default_q_positions(b, t, s), kv_lengths, causal=causal,
                          sliding_window=sliding_window)
    kk, vv = (jnp.repeat(x.astype(jnp.float32), n // kh, axis=2) for x in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk, precision="highest") / np.sqrt(h)
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    j = jnp.arange(s)
    valid = ((j >= lo[:, :, None]) & (j < hi[:, :, None]))[:, None]
    p = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, vv, precision="highest")


# Modules run first, in this order (whole modules, so module fixtures are set up once). pytest-xdist
# hands each worker a contiguous slice of the collection and then more as it finishes, so the
# 8-device subprocess of test_parallel.py (~2-3 min, the longest single item) starts at once and
# all its tests land on one worker, and the notebooks (~45 s each) follow: the long items never
# end up last, alone on one core.
FIRST = ("test_parallel.py", "test_notebooks.py")


def _first_rank(item):
    name = item.path.name
    return FIRST.index(name) if name in FIRST else len(FIRST)


def pytest_collection_modifyitems(config, items):
    """Long modules first (``FIRST``); ``DETJAX_NODEIDS=FILE`` keeps only the tests whose node ids
    are lines of FILE (to rerun the tests a cut call left unfinished: pass their files as the
    arguments). On the GPU machine (pytest 9.1.1, xdist 3.8) neither this under ``-n 8`` (run s21-4:
    an INTERNALERROR in xdist's scheduler) nor parametrized ids on the command line under ``-n 8``
    (s21-2: 0 items) worked; both work here, with and without xdist. There, use ``-k`` or
    ``DETJAX_SHARD``. ``DETJAX_SHARD=i/n`` keeps every n-th collected test starting at the i-th
    (0-based), so a GPU suite that exceeds one call's time limit can run in n calls
    (``scripts/gpu_suite.sh``)."""
    items.sort(key=_first_rank)   # stable: the collection order otherwise
    listed = os.environ.get("DETJAX_NODEIDS")
    if listed:
        with open(listed) as f:
            wanted = {line.strip() for line in f if line.strip()}
        missing = wanted - {it.nodeid for it in items}
        if missing:
            raise pytest.UsageError(f"DETJAX_NODEIDS={listed!r}: not collected: {sorted(missing)[:5]}")
        _keep(config, items, [it.nodeid in wanted for it in items])
    shard = os.environ.get("DETJAX_SHARD")
    if not shard:
        return
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"DETJAX_SHARD={shard!r}: expected 'i/n' with 0 <= i < n") from None
    _keep(config, items, [k % n == i for k in range(len(items))])


def _keep(config, items, flags):
    """Keep ``items[k]`` where ``flags[k]``, in order; report the rest as deselected."""
    dropped = [it for it, f in zip(items, flags) if not f]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = [it for it, f in zip(items, flags) if f]
