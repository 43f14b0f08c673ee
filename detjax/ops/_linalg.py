"""Public contractions: ``matmul``, ``dot_general``, ``einsum`` on the fixed-order matmul kernel.

Every contraction is reshaped to ``[B, M, K] @ [B, K, N]`` (or ``[B, N, K]`` for a weight stored
with its contracting dims last, which avoids a transpose) and run by
``pallas_kernels.matmul.matmul_kernel_call``: K accumulated in 64-wide tiles from k = 0 in float32.
Rows of the left operand never share arithmetic, so the result of a row does not depend on what
else is in the batch.

Gradients use ``jax.custom_vjp`` and the same kernel for ``dA = g @ B^T`` and ``dB = A^T @ g``:
run-to-run deterministic (no atomics). Forward-mode (``jax.jvp``) is not supported.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from detjax.ops._checks import check_array, check_float_dtype
from pallas_kernels import backend as _backend
from pallas_kernels.matmul import grouped_matmul_call, matmul_kernel_call

__all__ = ["matmul", "dot_general", "einsum", "head_projections"]


# ---------------------------------------------------------------------------------------------
# The differentiable core: [B, M, K] x [B, K, N] (or [B, N, K] when transpose_b).

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _bmm(a, b, transpose_b, out_dtype, precision, backend):
    return matmul_kernel_call(a, b, transpose_b=transpose_b, out_dtype=out_dtype,
                              precision=precision, backend=backend)


def _bmm_fwd(a, b, transpose_b, out_dtype, precision, backend):
    return _bmm(a, b, transpose_b, out_dtype, precision, backend), (a, b)


def _bmm_bwd(transpose_b, out_dtype, precision, backend, res, g):
    a, b = res
    g = g.astype(a.dtype)
    run = functools.partial(matmul_kernel_call, precision=precision, backend=backend)
    # dA = g @ B^T ; B is [B,K,N] (use it as a transposed [B,N',K']) or [B,N,K] (use it as is).
    da = run(g, b, transpose_b=not transpose_b, out_dtype=a.dtype)
    if transpose_b:   # B: [B,N,K]; dB = g^T @ A
        db = run(jnp.swapaxes(g, 1, 2), a, out_dtype=b.dtype)
    else:             # B: [B,K,N]; dB = A^T @ g
        db = run(jnp.swapaxes(a, 1, 2), g, out_dtype=b.dtype)
    return da, db


_bmm.defvjp(_bmm_fwd, _bmm_bwd)


# [M, K] against weights in "heads" layout [G, K, H] (GPU: read in place, one launch for all).

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped(a, ws, out_dtype, precision, backend):
    return grouped_matmul_call(a, ws, out_dtype=out_dtype, precision=precision, backend=backend)


def _grouped_fwd(a, ws, out_dtype, precision, backend):
    return _grouped(a, ws, out_dtype, precision, backend), (a, ws)


def _grouped_bwd(out_dtype, precision, backend, res, gs):
    """Per weight, ``_bmm_bwd`` on the transposed ``[K, G * H]`` weight; ``da`` summed over the
    weights in their order."""
    a, ws = res
    da, dws = None, []
    for w, g in zip(ws, gs):
        G, K, H = w.shape
        b = jnp.transpose(w, (1, 0, 2)).reshape(1, K, G * H)
        da_w, db = _bmm_bwd(False, out_dtype, precision, backend, (a[None], b), g[None])
        da = da_w[0] if da is None else da + da_w[0]
        dws.append(jnp.transpose(db[0].reshape(K, G, H), (1, 0, 2)))
    return da, tuple(dws)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def _heads_layout(rhs_ndim, rc, rb):
    """``(lead, tail)`` free dims if the rhs is ``[lead..., contracting..., tail...]`` with both
    non-empty and no batch dims (a Gemma ``[N, D, H]`` projection), else ``None``."""
    if rb or not rc or tuple(rc) != tuple(range(rc[0], rc[0] + len(rc))):
        return None
    lead, tail = tuple(range(rc[0])), tuple(range(rc[-1] + 1, rhs_ndim))
    return (lead, tail) if lead and tail else None


# ---------------------------------------------------------------------------------------------

def _precision_name(precision) -> str:
    """Map jax precision arguments to the kernel's: full f32 unless TF32 is asked for explicitly."""
    if precision is None:
        return "highest"
    if isinstance(precision, str):
        p = precision.lower()
        if p == "tf32":
            return "tf32"
        if p in ("highest", "float32", "default", "high"):
            return "highest"
        raise ValueError(f"precision={precision!r} is not supported; use None/'highest' or 'tf32'")
    if isinstance(precision, (tuple, list)):
        names = {_precision_name(p) for p in precision}
        return "tf32" if names == {"tf32"} else "highest"
    if isinstance(precision, lax.Precision):
        return "highest"  # DEFAULT/HIGH are not lowered to TF32: f32 stays f32 unless asked
    if isinstance(precision, lax.DotAlgorithmPreset):
        if precision == lax.DotAlgorithmPreset.TF32_TF32_F32:
            return "tf32"
        if precision in (lax.DotAlgorithmPreset.DEFAULT, lax.DotAlgorithmPreset.F32_F32_F32,
                         lax.DotAlgorithmPreset.BF16_BF16_F32, lax.DotAlgorithmPreset.F16_F16_F32):
            return "highest"
        raise ValueError(f"precision={precision} is not supported by detjax's matmul; "
                         "use None/'highest' or 'tf32'")
    raise ValueError(f"precision={precision!r} is not supported; use None/'highest' or 'tf32'")


def _common_dtype(lhs, rhs, backend):
    dl = check_float_dtype(lhs, "lhs", backend)
    dr = check_float_dtype(rhs, "rhs", backend)
    return jnp.promote_types(dl, dr)


def _out_dtype(compute_dtype, preferred_element_type):
    if preferred_element_type is None:
        return compute_dtype
    dt = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"preferred_element_type must be a floating dtype; got {dt}")
    return dt


def _check_dims(dimension_numbers, lhs, rhs):
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise ValueError("dimension_numbers must be ((lhs_contracting, rhs_contracting), "
                         f"(lhs_batch, rhs_batch)); got {dimension_numbers!r}") from None
    for dims, arr, nm in ((lc, lhs, "lhs contracting"), (lb, lhs, "lhs batch"),
                          (rc, rhs, "rhs contracting"), (rb, rhs, "rhs batch")):
        for d in dims:
            if not 0 <= d < arr.ndim:
                raise ValueError(f"dimension_numbers: {nm} dim {d} is out of range for shape "
                                 f"{tuple(arr.shape)}")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers: lhs and rhs must list as many contracting dims "
                         f"({lc} vs {rc}) and batch dims ({lb} vs {rb})")
    if len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb):
        raise ValueError(f"dimension_numbers repeats a dimension: {dimension_numbers!r}")
    for a, b in zip(lc, rc):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"contracting dims do not match: lhs dim {a} has size {lhs.shape[a]} "
                             f"(lhs shape {tuple(lhs.shape)}) but rhs dim {b} has size "
                             f"{rhs.shape[b]} (rhs shape {tuple(rhs.shape)})")
    for a, b in zip(lb, rb):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"batch dims do not match: lhs dim {a} has size {lhs.shape[a]} "
                             f"(lhs shape {tuple(lhs.shape)}) but rhs dim {b} has size "
                             f"{rhs.shape[b]} (rhs shape {tuple(rhs.shape)})")
    return lc, rc, lb, rb


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                *, backend=None, **unused):
    """``lax.dot_general`` with a fixed, batch-invariant reduction order.

    Args:
      lhs, rhs: floating arrays (bf16, f16, f32; mixed dtypes are promoted).
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: ``None`` / ``lax.Precision.*`` / ``'highest'``: f32 inputs at full IEEE f32;
        ``'tf32'`` or ``lax.DotAlgorithmPreset.TF32_TF32_F32``: the faster TF32 algorithm.
      preferred_element_type: output dtype (accumulation is always float32).
      backend: detjax backend override.

    Returns:
      ``(batch..., lhs_free..., rhs_free...)`` like ``lax.dot_general``.
    """
    unused.pop("out_sharding", None)
    if unused:
        raise TypeError(f"dot_general got unsupported arguments {sorted(unused)}")
    lhs, rhs = check_array(lhs, "lhs"), check_array(rhs, "rhs")
    compute = _common_dtype(lhs, rhs, backend)
    out_dtype = _out_dtype(compute, preferred_element_type)
    prec = _precision_name(precision)
    lc, rc, lb, rb = _check_dims(dimension_numbers, lhs, rhs)
    lf = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
    rf = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
    batch_shape = tuple(lhs.shape[d] for d in lb)
    lfree_shape = tuple(lhs.shape[d] for d in lf)
    rfree_shape = tuple(rhs.shape[d] for d in rf)
    B, M = math.prod(batch_shape), math.prod(lfree_shape)
    K, N = math.prod(lhs.shape[d] for d in lc), math.prod(rfree_shape)
    out_shape = batch_shape + lfree_shape + rfree_shape
    if 0 in (B, M, N):
        return jnp.zeros(out_shape, out_dtype)
    a = jnp.transpose(lhs.astype(compute), lb + lf + lc).reshape(B, M, K)
    be = _backend.resolve(backend)
    heads = _heads_layout(rhs.ndim, rc, rb) if be == "gpu" else None
    if heads is not None:   # [G, K, H] weight: read in place instead of transposing it to [K, G*H]
        g = math.prod(rhs.shape[d] for d in heads[0])
        w = rhs.astype(compute).reshape(g, K, N // g)
        out = _grouped(a[0], (w,), jnp.dtype(out_dtype).name, prec, be)[0]
        return out.reshape(out_shape)
    # Keep the rhs in its stored layout when its contracting dims are already trailing ([.., N, K]).
    transpose_b = rb + rf + rc == tuple(range(rhs.ndim)) and len(rc) > 0 and len(rf) > 0
    if transpose_b:
        b = rhs.astype(compute).reshape(B, N, K)
    else:
        b = jnp.transpose(rhs.astype(compute), rb + rc + rf).reshape(B, K, N)
    out = _bmm(a, b, transpose_b, jnp.dtype(out_dtype).name, prec, be)
    return out.reshape(out_shape)


def matmul(a, b, *, precision=None, preferred_element_type=None, backend=None):
    """``a @ b`` with a fixed K order (``jnp.matmul`` semantics).

    ``a``: ``[..., M, K]`` or ``[K]``; ``b``: ``[K, N]`` (the usual weight), ``[K]``, or
    ``[..., K, N]`` with batch dims broadcast against ``a``'s. With a 2-D ``b`` all leading dims of
    ``a`` are flattened into M, so any row's result is independent of the others.
    """
    a, b = check_array(a, "a"), check_array(b, "b")
    check_float_dtype(a, "a", backend)
    check_float_dtype(b, "b", backend)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs arrays of rank >= 1; got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: contracting dims do not match: a has shape {tuple(a.shape)} "
                         f"(K={a.shape[-1]}) but b has shape {tuple(b.shape)} "
                         f"(K={b.shape[-2 if b.ndim > 1 else 0]})")
    kw = dict(precision=precision, preferred_element_type=preferred_element_type, backend=backend)
    if b.ndim <= 2:
        return dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), **kw)
    # Batched b: broadcast batch dims, then contract with batch dims.
    a2 = a if a.ndim > 1 else a[None, :]
    batch = jnp.broadcast_shapes(a2.shape[:-2], b.shape[:-2])
    a2 = jnp.broadcast_to(a2, batch + a2.shape[-2:])
    b2 = jnp.broadcast_to(b, batch + b.shape[-2:])
    nb = len(batch)
    out = dot_general(a2, b2, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))), **kw)
    return out if a.ndim > 1 else out[..., 0, :]


def einsum(subscripts, *operands, precision=None, preferred_element_type=None, backend=None):
    """``jnp.einsum`` whose contractions run on detjax's fixed-order matmul.

    The contraction path is fixed left to right (``optimize=False``): a shape-dependent path
    (opt_einsum's default) could reorder a 3-operand product differently for another batch size.
    Indices summed out of a single operand are reduced with ``detjax.ops.sum`` first.
    """
    if not isinstance(subscripts, str):
        raise TypeError("detjax.ops.einsum takes the subscripts-string form, e.g. 'bd,df->bf'")
    ops_ = [check_array(o, f"operands[{i}]") for i, o in enumerate(operands)]
    for i, o in enumerate(ops_):
        check_float_dtype(o, f"operands[{i}]", backend)
    subscripts, ops_ = _presum_unique_indices(subscripts, ops_, backend)
    dg = functools.partial(dot_general, backend=backend)
    out = jnp.einsum(subscripts, *ops_, optimize=False, precision=precision,
                     preferred_element_type=preferred_element_type, _dot_general=dg)
    return out


def _presum_unique_indices(subscripts, operands, backend):
    """Reduce indices that appear in one operand only and not in the output, with detjax.ops.sum."""
    from detjax.ops._reductions import sum as _sum
    s = subscripts.replace(" ", "")
    if "->" not in s:
        return subscripts, operands  # implicit form: every single-use index is kept in the output
    lhs, out = s.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise ValueError(f"einsum: subscripts {subscripts!r} name {len(terms)} operands but "
                         f"{len(operands)} were given")
    new_terms, new_ops = [], []
    for i, (t, op) in enumerate(zip(terms, operands)):
        if "." in t:
            new_terms.append(t)
            new_ops.append(op)
            continue
        others = "".join(terms[:i] + terms[i + 1:]) + out
        drop = [k for k, c in enumerate(t) if c not in others and t.count(c) == 1]
        if drop:
            op = _sum(op, axis=tuple(drop), backend=backend)
            t = "".join(c for k, c in enumerate(t) if k not in drop)
        new_terms.append(t)
        new_ops.append(op)
    return ",".join(new_terms) + "->" + out, new_ops


def head_projections(x, weights, *, precision=None, preferred_element_type=None, backend=None):
    """Several projections of the same input: ``[einsum('...d,gdh->...gh', x, w) for w in weights]``.

    ``x``: ``[..., D]``; ``weights``: a sequence of ``[G_i, D, H_i]`` arrays (Gemma's q/k/v
    projections ``[heads, d_model, head_dim]``). Every output has bitwise the values of
    ``dot_general`` with that weight alone; on the GPU all of them come from one kernel launch that
    reads the weights in place (a decode step of a small model is launch-bound). Differentiable
    (the backward is ``dot_general``'s, per weight; ``x``'s gradient sums them in order).
    """
    x = check_array(x, "x")
    weights = [check_array(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not weights:
        raise ValueError("head_projections needs at least one weight")
    if x.ndim < 1:
        raise ValueError(f"x must have rank >= 1; got shape {tuple(x.shape)}")
    for i, w in enumerate(weights):
        if w.ndim != 3 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weights[{i}] must have shape [G, D={x.shape[-1]}, H]; got "
                             f"{tuple(w.shape)}")
    compute = check_float_dtype(x, "x", backend)
    for i, w in enumerate(weights):
        compute = jnp.promote_types(compute, check_float_dtype(w, f"weights[{i}]", backend))
    kw = dict(precision=precision, preferred_element_type=preferred_element_type, backend=backend)
    be = _backend.resolve(backend)
    lead = x.shape[:-1]
    if be != "gpu" or len(weights) == 1 or math.prod(lead) == 0:
        return [dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), **kw) for w in weights]
    out_dtype = _out_dtype(compute, preferred_element_type)
    a = x.astype(compute).reshape(-1, x.shape[-1])
    ws = tuple(w.astype(compute) for w in weights)
    outs = _grouped(a, ws, jnp.dtype(out_dtype).name, _precision_name(precision), be)
    return [o.reshape(lead + (w.shape[0], w.shape[2])) for o, w in zip(outs, ws)]
