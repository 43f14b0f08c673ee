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
``mean = sum / N`` (divided inside the kernel); ``logsumexp = m + log(sum(exp(x - m)))`` with ``m = max`` (``m`` replaced by 0
when it is not finite, like ``jax.nn.logsumexp``); ``softmax = exp(x - m) * (1 / s)``;
``log_softmax = (x - m) - log(s)``; ``rms_norm = x * rsqrt(sum(x^2) / N + eps) * (offset + scale)``.
Results are rounded once to the output dtype.

``*_reference`` functions restate the same semantics in plain JAX (on CPU they reproduce the
interpret-mode bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels.order import REDUCE_CHUNK

GPU_NUM_WARPS = 4
OPS = ("sum", "mean", "max", "logsumexp", "softmax", "log_softmax", "rms_norm")


def _round_up(x, k):
    return (x + k - 1) // k * k


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _load(ref, j, n, other):
    from jax.experimental.pallas import triton as plgpu
    idx = j * REDUCE_CHUNK + jnp.arange(REDUCE_CHUNK)
    mask = idx < n
    return plgpu.load(ref.at[idx], mask=mask, other=other), idx, mask


def _chunks(n):
    return _backend.opaque_trip_count(pl.cdiv(n, REDUCE_CHUNK))


def _lane_sum(ref, n, acc_dtype, fn=lambda v: v):
    """Fixed-order sum of fn(x) over a row: ascending chunks into C lanes, then one [C] tree."""
    def body(j, acc):
        v, _, mask = _load(ref, j, n, 0)
        return acc + jnp.where(mask, fn(v.astype(acc_dtype)), 0)
    lanes = lax.fori_loop(0, _chunks(n), body, jnp.zeros((REDUCE_CHUNK,), acc_dtype))
    return jnp.sum(lanes)


def _lane_max(ref, n, acc_dtype):
    """Exact max; NaN is counted separately because the GPU's max instruction drops NaN."""
    def body(j, carry):
        acc, nans = carry
        v, _, mask = _load(ref, j, n, 0)
        v = jnp.where(mask, v.astype(acc_dtype), -jnp.inf)
        return jnp.maximum(acc, v), nans + jnp.where(v != v, 1.0, 0.0).astype(acc_dtype)
    init = (jnp.full((REDUCE_CHUNK,), -jnp.inf, acc_dtype), jnp.zeros((REDUCE_CHUNK,), acc_dtype))
    lanes, nans = lax.fori_loop(0, _chunks(n), body, init)
    return jnp.where(jnp.sum(nans) > 0, jnp.nan, jnp.max(lanes)).astype(acc_dtype)


def _safe_max(m):
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def _row_kernel(*refs, op, n, eps, offset, acc_dtype):
    from jax.experimental.pallas import triton as plgpu
    if op == "rms_norm":
        x_ref, w_ref, o_ref = refs
    else:
        x_ref, o_ref = refs
    n_static = n

    if op in ("sum", "mean"):
        total = _lane_sum(x_ref, n, acc_dtype)
        if op == "mean":
            total = total / n_static
        o_ref[...] = jnp.full(o_ref.shape, total, o_ref.dtype)
        return
    if op == "max":
        o_ref[...] = jnp.full(o_ref.shape, _lane_max(x_ref, n, acc_dtype), o_ref.dtype)
        return
    if op == "rms_norm":
        ss = _lane_sum(x_ref, n, acc_dtype, lambda v: v * v)
        r = lax.rsqrt(ss / n_static + eps)

        @pl.loop(0, _chunks(n))
        def _(j):
            v, idx, mask = _load(x_ref, j, n, 0)
            w = plgpu.load(w_ref.at[idx], mask=mask, other=0)
            y = (v.astype(acc_dtype) * r) * (offset + w.astype(acc_dtype))
            plgpu.store(o_ref.at[idx], y.astype(o_ref.dtype), mask=mask)
        return

    m = _safe_max(_lane_max(x_ref, n, acc_dtype))
    s = _lane_sum(x_ref, n, acc_dtype, lambda v: jnp.exp(v - m))
    if op == "logsumexp":
        o_ref[...] = jnp.full(o_ref.shape, m + jnp.log(s), o_ref.dtype)
        return
    log_s = jnp.log(s)
    inv_s = 1 / s  # a multiply per element: XLA's CPU compiler was seen rewriting a divide by shape

    @pl.loop(0, _chunks(n))
    def _(j):
        v, idx, mask = _load(x_ref, j, n, 0)
        v = v.astype(acc_dtype)
        y = jnp.exp(v - m) * inv_s if op == "softmax" else (v - m) - log_s
        plgpu.store(o_ref.at[idx], y.astype(o_ref.dtype), mask=mask)


def row_reduce(x, op: str, *, weight=None, eps: float = 1e-6, offset: float = 1.0,
               out_dtype=None, backend=None):
    """Run a fixed-order row kernel on ``x: [R, N]``.

    ``op`` in ``OPS``. ``sum``/``mean``/``max``/``logsumexp`` return ``[R]``; ``softmax``/``log_softmax``/
    ``rms_norm`` return ``[R, N]``. ``weight`` (``[N]``) is RMSNorm's scale. ``out_dtype`` defaults to
    ``x.dtype``. Inputs must already be validated by ``detjax.ops``.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {OPS}")
    be = _backend.resolve(backend)
    if be in ("tpu", "tpu-interpret"):
        raise NotImplementedError(f"backend {be!r}: the TPU row-reduction lowering is not implemented yet")
    R, N = x.shape
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    acc_dtype = _acc_dtype(x.dtype)
    # Row stride padded to a multiple of 16 bytes: Triton picks the register layout of a row (and so
    # the shape of the lane tree) from the pointers' alignment, which was measured on the H100 to give
    # different bits for N=1000 and N=1025. Padded columns are masked (never read as data).
    Ns = _round_up(N, 16 // jnp.dtype(x.dtype).itemsize)
    if Ns != N:
        x = jnp.pad(x, ((0, 0), (0, Ns - N)))
        if weight is not None:
            weight = jnp.pad(weight, (0, Ns - N))
    elementwise = op in ("softmax", "log_softmax", "rms_norm")
    if elementwise:
        out_shape = jax.ShapeDtypeStruct((R, Ns), out_dtype)
        out_spec = pl.BlockSpec((None, Ns), lambda r: (r, 0))
    else:
        # One scalar per row, stored as a [R, 1] column.
        out_shape = jax.ShapeDtypeStruct((R, 1), out_dtype)
        out_spec = pl.BlockSpec((None, 1), lambda r: (r, 0))
    in_specs = [pl.BlockSpec((None, Ns), lambda r: (r, 0))]
    args = [x]
    if op == "rms_norm":
        in_specs.append(pl.BlockSpec((Ns,), lambda r: (0,)))
        args.append(weight)
    kernel = functools.partial(_row_kernel, op=op, n=N, eps=eps, offset=offset, acc_dtype=acc_dtype)
    compiler_params = None
    if be == "gpu":
        from jax.experimental.pallas import triton as pltriton
        compiler_params = pltriton.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=1)
    out = pl.pallas_call(
        kernel,
        grid=(R,),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=_backend.interpret_arg(be),
        compiler_params=compiler_params,
        name=f"detjax_row_{op}",
    )(*args)
    if elementwise:
        return out[:, :N] if Ns != N else out
    return out[:, 0]


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


def row_reduce_reference(x, op, *, weight=None, eps=1e-6, offset=1.0, out_dtype=None):
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    xf = x.astype(_acc_dtype(x.dtype))
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
        return ((xf * r[:, None]) * (offset + weight.astype(xf.dtype))).astype(out_dtype)
    m = _safe_max(_ref_max(xf))[:, None]
    s = _ref_sum(jnp.exp(xf - m))[:, None]
    if op == "logsumexp":
        return (m + jnp.log(s))[:, 0].astype(out_dtype)
    if op == "softmax":
        return (jnp.exp(xf - m) * (1 / s)).astype(out_dtype)
    if op == "log_softmax":
        return ((xf - m) - jnp.log(s)).astype(out_dtype)
    raise ValueError(f"op={op!r} is not one of {OPS}")
