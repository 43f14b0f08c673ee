"""Row reductions with a fixed reduction tree: sum, max, logsumexp, softmax, log_softmax, RMSNorm.

Reduction order (the product; see also ``pallas_kernels/order.py``)
-------------------------------------------------------------------
Input is ``[R, N]``; every row is reduced by its own program (grid over rows), so no row ever
shares arithmetic with another and the row's position and the batch size cannot matter.

Within a row (``C = REDUCE_CHUNK`` = 1024):

1. The row is read in chunks ``[j * C, (j + 1) * C)`` anchored at column 0, in ascending ``j``.
   Lanes past ``N`` are masked to the operation's identity (0 for sums, -inf for max).
2. A vector of ``C`` float32 lane accumulators, initialised to the identity, takes each chunk
   elementwise (``acc[l] = acc[l] + x[j * C + l]``, or ``max``) in ascending ``j``.
3. The ``C`` lanes are combined by one reduction of a length-``C`` vector: the backend's tree for
   exactly that shape (GPU: Triton's in-register / shuffle tree for a ``[C]`` tensor with a fixed
   ``num_warps``; interpret: XLA's CPU reduce of a ``[C]`` vector). Its shape never changes, so its
   tree never changes.

Zero extension: appending identity elements to a row only adds identities to some lanes and
appends whole chunks of identities, which leaves every lane bit-identical (``a + 0 == a``,
``max(a, -inf) == a``), so the result is bit-identical.

Derived kernels use only these reductions plus elementwise float32 math:
``mean = sum / N`` (divided inside the kernel); ``logsumexp = m + log(sum(exp(x - m)))`` with ``m``
the max of the row's non-NaN elements (a NaN element makes the sum, and so the result, NaN; ``m`` is
replaced by 0 when it is not finite, like ``jax.nn.logsumexp``; softmax and log_softmax use the raw
max, so a row holding +inf gives NaN, like ``jax.nn.softmax``); ``softmax = exp(x - m) * (1 / s)``;
``log_softmax = (x - m) - log(s)``; ``rms_norm = x * rsqrt(sum(x^2) / N + eps) * (offset + scale)``.
Results are rounded once to the output dtype. RMSNorm with a ``residual`` (the pre-norm block's
``x + norm(a)``; bf16/f16 only, see ``row_reduce``) then adds the residual in float32 and rounds
again: bitwise ``residual + y`` in the output dtype (the sum of two bf16/f16 values is exact in
float32, so there is no double rounding).

``*_reference`` functions restate the same semantics in plain JAX (on CPU they reproduce the
interpret-mode bits).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels._rows import acc_dtype_for, call_row_kernel
from pallas_kernels.order import REDUCE_CHUNK

OPS = ("sum", "mean", "max", "logsumexp", "softmax", "log_softmax", "rms_norm")


# On the GPU a row of at most RESIDENT_MAX_CHUNKS chunks is read from memory once and kept in
# registers for every pass (max, sum, write): the passes run the very same per-lane operations in
# the same ascending chunk order as the loop, only unrolled, so the bits are the same
# (tests/test_reductions.py::test_gpu_resident_rows_bitwise_equal_to_loop checks it on the GPU).
# Interpret mode always loops (see backend.opaque_trip_count).
RESIDENT_MAX_CHUNKS = 8


# A resident chunk that lies wholly inside the row (static: ``(j + 1) * C <= n``) is loaded
# without a mask, and the kernels skip its selects (``mask is None``): every lane is valid, so the
# selects were identities and the bits are the same. (GPU; the loop's chunks keep their masks.)
# Not measurably faster (H200 s14-2: logsumexp [32768, 4096] 97.2 -> 97.0 us), but this is the
# code the session-14 GPU runs tested; False restores the masked loads (same bits, s14-2).
ELIDE_FULL_MASKS = True

# logsumexp, softmax and log_softmax take the row max without counting NaNs: a NaN element makes
# the exp-sum NaN, so the result is NaN either way (jax.nn's semantics), and rows without NaN take
# the same operations, with the same bits. ``max`` itself keeps the count (the GPU's max
# instruction drops NaN). The count was a third reduction tree per row: without it (H200 s14-2)
# logsumexp [32768, 4096] bf16 went from 97.2 to 85.7 us, softmax / log_softmax 3% faster.
# True restores the count (for the A/B in results/2026-12-04-h200/s14_1_bench.py).
DERIVED_NAN_COUNT = False


def _load(ref, j, n, other, static=False):
    from jax.experimental.pallas import triton as plgpu
    idx = j * REDUCE_CHUNK + jnp.arange(REDUCE_CHUNK)
    if static and ELIDE_FULL_MASKS and (j + 1) * REDUCE_CHUNK <= n:
        return plgpu.load(ref.at[idx]), idx, None
    mask = idx < n
    return plgpu.load(ref.at[idx], mask=mask, other=other), idx, mask


def _load_at(ref, idx, mask):
    """A second row (RMSNorm's scale, a residual) at the chunk's lanes, masked like the chunk."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[idx]) if mask is None else plgpu.load(ref.at[idx], mask=mask, other=0)


def _where(mask, v, other):
    return v if mask is None else jnp.where(mask, v, other)


def _chunks(n):
    return _backend.opaque_trip_count(pl.cdiv(n, REDUCE_CHUNK))


# On the GPU a long row's loop loads LOOP_UNROLL chunks before folding them (in ascending order,
# the very same per-lane operations): one program per row with one 4 KB load in flight at a time
# is latency-bound (our estimate for the sampling head's log_softmax over [8, 256000] logits; the
# speed-up was not measured in isolation, run s5-9 timed only whole generation). The fold order
# does not change, so neither do the bits
# (tests/test_reductions.py::test_gpu_unrolled_loop_bitwise_equal). Interpret mode: no unrolling.
LOOP_UNROLL = 8


def _fold(ref, n, resident, body, init, unroll=1):
    """``body((v, idx, mask), carry)`` over the row's chunks in ascending order."""
    if resident is not None:
        carry = init
        for chunk in resident:
            carry = body(chunk, carry)
        return carry
    def step(j, c):
        return body(_load(ref, j, n, 0), c)

    nch = pl.cdiv(n, REDUCE_CHUNK)
    if unroll > 1 and nch >= 2 * unroll:
        def body_u(i, c):
            chunks = [_load(ref, i * unroll + u, n, 0) for u in range(unroll)]
            for chunk in chunks:
                c = body(chunk, c)
            return c
        init = lax.fori_loop(0, _backend.opaque_trip_count(nch // unroll), body_u, init)
        start = nch // unroll * unroll
        return lax.fori_loop(start, start + _backend.opaque_trip_count(nch - start), step, init)
    return lax.fori_loop(0, _chunks(n), step, init)


def _lane_sum(ref, n, acc_dtype, fn=lambda v: v, resident=None, unroll=1):
    """Fixed-order sum of fn(x) over a row: ascending chunks into C lanes, then one [C] tree."""
    def body(chunk, acc):
        v, _, mask = chunk
        return acc + _where(mask, fn(v.astype(acc_dtype)), 0)
    lanes = _fold(ref, n, resident, body, jnp.zeros((REDUCE_CHUNK,), acc_dtype), unroll)
    return jnp.sum(lanes)


def _lane_max(ref, n, acc_dtype, resident=None, unroll=1, count_nans=True):
    """Exact max; NaN is counted separately because the GPU's max instruction drops NaN
    (``count_nans=False``: the max of the non-NaN elements)."""
    def body(chunk, carry):
        acc, nans = carry
        v, _, mask = chunk
        v = _where(mask, v.astype(acc_dtype), -jnp.inf)
        if not count_nans:
            return jnp.maximum(acc, v), nans
        return jnp.maximum(acc, v), nans + jnp.where(v != v, 1.0, 0.0).astype(acc_dtype)
    lanes0 = jnp.full((REDUCE_CHUNK,), -jnp.inf, acc_dtype)
    init = (lanes0, jnp.zeros((REDUCE_CHUNK,) if count_nans else (), acc_dtype))
    lanes, nans = _fold(ref, n, resident, body, init, unroll)
    if not count_nans:
        return jnp.max(lanes).astype(acc_dtype)
    return jnp.where(jnp.sum(nans) > 0, jnp.nan, jnp.max(lanes)).astype(acc_dtype)


def _safe_max(m):
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def _row_kernel(*refs, op, n, eps, offset, acc_dtype, resident, unroll=1, residual=False):
    from jax.experimental.pallas import triton as plgpu
    r_ref = None
    if op == "rms_norm" and residual:
        x_ref, w_ref, r_ref, o_ref = refs
    elif op == "rms_norm":
        x_ref, w_ref, o_ref = refs
    else:
        x_ref, o_ref = refs
    n_static = n
    chunks = ([_load(x_ref, j, n, 0, static=True) for j in range(pl.cdiv(n, REDUCE_CHUNK))]
              if resident else None)

    def for_each_chunk(fn):
        _fold(x_ref, n, chunks, lambda chunk, carry: fn(chunk), None, unroll)

    if op in ("sum", "mean"):
        total = _lane_sum(x_ref, n, acc_dtype, resident=chunks, unroll=unroll)
        if op == "mean":
            total = total / n_static
        o_ref[...] = jnp.full(o_ref.shape, total, o_ref.dtype)
        return
    if op == "max":
        m = _lane_max(x_ref, n, acc_dtype, resident=chunks, unroll=unroll)
        o_ref[...] = jnp.full(o_ref.shape, m, o_ref.dtype)
        return
    if op == "rms_norm":
        ss = _lane_sum(x_ref, n, acc_dtype, lambda v: v * v, resident=chunks, unroll=unroll)
        r = lax.rsqrt(ss / n_static + eps)

        def write_rms(chunk):
            v, idx, mask = chunk
            w = _load_at(w_ref, idx, mask)
            y = ((v.astype(acc_dtype) * r) * (offset + w.astype(acc_dtype))).astype(o_ref.dtype)
            if r_ref is not None:
                res = _load_at(r_ref, idx, mask)
                y = (res.astype(acc_dtype) + y.astype(acc_dtype)).astype(o_ref.dtype)
            plgpu.store(o_ref.at[idx], y, mask=mask)
        for_each_chunk(write_rms)
        return

    m = _lane_max(x_ref, n, acc_dtype, resident=chunks, unroll=unroll,
                  count_nans=DERIVED_NAN_COUNT)
    if op == "logsumexp":  # like jax.nn.logsumexp; softmax keeps the raw max (+inf -> NaN, IEEE)
        m = _safe_max(m)
    s = _lane_sum(x_ref, n, acc_dtype, lambda v: jnp.exp(v - m), resident=chunks, unroll=unroll)
    if op == "logsumexp":
        o_ref[...] = jnp.full(o_ref.shape, m + jnp.log(s), o_ref.dtype)
        return
    log_s = jnp.log(s)
    inv_s = 1 / s  # a multiply per element: XLA's CPU compiler was seen rewriting a divide by shape

    def write_soft(chunk):
        v, idx, mask = chunk
        v = v.astype(acc_dtype)
        y = jnp.exp(v - m) * inv_s if op == "softmax" else (v - m) - log_s
        plgpu.store(o_ref.at[idx], y.astype(o_ref.dtype), mask=mask)
    for_each_chunk(write_soft)


def row_reduce(x, op: str, *, weight=None, eps: float = 1e-6, offset: float = 1.0,
               out_dtype=None, backend=None, resident=None, residual=None):
    """Run a fixed-order row kernel on ``x: [R, N]``.

    ``op`` in ``OPS``. ``sum``/``mean``/``max``/``logsumexp`` return ``[R]``; ``softmax``/``log_softmax``/
    ``rms_norm`` return ``[R, N]``. ``weight`` (``[N]``) is RMSNorm's scale; ``residual`` (``[R, N]``,
    ``rms_norm`` only, of the output dtype, which must be bf16 or f16) is added to its rounded
    result in the kernel. (Not for float32: there the norm's last multiply and the add could be
    contracted into one FMA, which ``residual + y`` outside the kernel never is; ``detjax.ops``
    adds a float32 residual outside.) ``out_dtype`` defaults to
    ``x.dtype``. Inputs must already be validated by ``detjax.ops``. ``resident``: GPU only, keep
    the row in registers (default: when it has at most ``RESIDENT_MAX_CHUNKS`` chunks); the bits
    are the same either way.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {OPS}")
    be = _backend.resolve(backend)
    if be in ("tpu", "tpu-interpret"):  # Mosaic TPU lowering, its own documented order
        from pallas_kernels import tpu
        y = tpu.row_reduce(x, op, weight=weight, eps=eps, offset=offset, out_dtype=out_dtype,
                           backend=be)
        return y if residual is None else _add_residual(residual, y)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if residual is not None and (op != "rms_norm" or out_dtype.itemsize != 2
                                 or residual.dtype != out_dtype):
        raise ValueError(f"row_reduce: a residual is for rms_norm with a bf16/f16 output of its "
                         f"dtype; got op={op!r}, output {out_dtype}, residual {residual.dtype}")
    if be != "gpu":
        resident = False
    elif resident is None:
        resident = pl.cdiv(x.shape[1], REDUCE_CHUNK) <= RESIDENT_MAX_CHUNKS
    kernel = functools.partial(_row_kernel, op=op, n=x.shape[1], eps=eps, offset=offset,
                               acc_dtype=acc_dtype_for(x.dtype), resident=bool(resident),
                               unroll=LOOP_UNROLL if be == "gpu" else 1,
                               residual=residual is not None)
    return call_row_kernel(kernel, x, name=f"detjax_row_{op}", out_dtype=out_dtype,
                           elementwise=op in ("softmax", "log_softmax", "rms_norm"), backend=be,
                           shared=(weight,) if op == "rms_norm" else (),
                           rows=() if residual is None else (residual,))


def _add_residual(residual, y):
    """``residual + y`` as the fused kernel computes it (float32 add, one rounding); ``y`` is
    materialised first, so its last multiply is never contracted with the add."""
    acc = acc_dtype_for(y.dtype)
    y = lax.optimization_barrier(y)
    return (residual.astype(acc) + y.astype(acc)).astype(y.dtype)


# ----------------------------------------------------------------------------------------------
# Plain-JAX references with the same semantics.

def _lanes(x, identity):
    R, N = x.shape
    Np = -(-max(N, 1) // REDUCE_CHUNK) * REDUCE_CHUNK
    x = jnp.pad(x, ((0, 0), (0, Np - N)), constant_values=identity)
    return x.reshape(R, Np // REDUCE_CHUNK, REDUCE_CHUNK)


def _ref_sum(x):
    lanes = _lanes(x, 0)
    acc = jnp.zeros((x.shape[0], REDUCE_CHUNK), x.dtype)
    for j in range(lanes.shape[1]):
        acc = acc + lanes[:, j]
    return lax.map(jnp.sum, acc)  # one [C] tree per row, as in the kernel


def _ref_max(x):
    return jnp.max(_lanes(x, -jnp.inf), axis=(1, 2))


def row_reduce_reference(x, op, *, weight=None, eps=1e-6, offset=1.0, out_dtype=None,
                         residual=None):
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    xf = x.astype(acc_dtype_for(x.dtype))
    if op == "sum":
        return _ref_sum(xf).astype(out_dtype)
    if op == "mean":
        n = x.shape[1]
        return lax.map(lambda t: t / n, _ref_sum(xf)).astype(out_dtype)
    if op == "max":
        return _ref_max(xf).astype(out_dtype)
    if op == "rms_norm":
        n = x.shape[1]
        r = lax.map(lambda ss: lax.rsqrt(ss / n + eps), _ref_sum(xf * xf))  # scalar, as in the kernel
        y = ((xf * r[:, None]) * (offset + weight.astype(xf.dtype))).astype(out_dtype)
        return y if residual is None else _add_residual(residual, y)
    m = _ref_max(xf)[:, None]
    if op == "logsumexp":
        m = _safe_max(m)
    s = _ref_sum(jnp.exp(xf - m))[:, None]
    if op == "logsumexp":
        return (m + jnp.log(s))[:, 0].astype(out_dtype)
    if op == "softmax":
        return (jnp.exp(xf - m) * (1 / s)).astype(out_dtype)
    if op == "log_softmax":
        return ((xf - m) - jnp.log(s)).astype(out_dtype)
    raise ValueError(f"op={op!r} is not one of {OPS}")
