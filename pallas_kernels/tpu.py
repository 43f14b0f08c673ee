"""detjax kernels lowered through Mosaic TPU (backends ``'tpu'`` and ``'tpu-interpret'``).

The entry points have the signatures of the GPU/interpret ones, so a caller only switches on the
resolved backend: ``matmul_kernel_call`` (``pallas_kernels/matmul.py``) and ``row_reduce``
(``pallas_kernels/reductions.py``). ``'tpu-interpret'`` runs exactly these kernel bodies in Pallas'
TPU interpret mode (simulated VMEM, race detection on). Attention's TPU kernels are in
``pallas_kernels/tpu_attention.py``.

TPU reduction order (see also ``pallas_kernels/order.py``)
-----------------------------------------------------------
Matmul, ``[B, M, K] @ [B, K, N]`` (or ``[B, N, K]`` transposed):

* Grid ``(B, Mp / TPU_BLOCK_M, Np / TPU_BLOCK_N, Kp / TPU_BLOCK_K)`` with the K axis LAST and
  sequential (``'arbitrary'``). One float32 VMEM accumulator per output tile, zeroed at ``k == 0``;
  K tiles ``[t * 256, (t + 1) * 256)`` anchored at k = 0 are added to it in ascending ``t``; the
  accumulator is rounded once to the output dtype at the last ``k``.
* Inside a tile the product is ONE Mosaic ``dot`` of a ``[128, 256] x [256, 128]`` tile on the MXU
  (f32 inputs at ``Precision.HIGHEST``). The tile shape is the same for every call: ``M``, ``N``
  and ``K`` are zero-padded in the wrapper to multiples of the tile, so the order never depends on
  the shape, the batch or the row position; appending zero columns to ``K`` only appends tiles of
  exact zeros (zero extension).
* No split-K, no shape-dependent tile choice.

Row reductions, ``[R, N]``:

* Rows are processed in blocks of ``TPU_ROW_BLOCK`` (8 rows for 32-bit data, 16 for 16-bit) per
  program; rows never interact (every operation is elementwise across rows or a per-row lane
  reduction of a fixed shape).
* Columns are padded in the wrapper to a multiple of ``REDUCE_CHUNK`` (1024, as on the GPU) with
  the operation's identity (0 for sum/mean/rms_norm; -inf for max and the softmax family, where
  ``exp(-inf - m) == 0``). There are no masked loads: the kernel walks chunks
  ``[j * 1024, (j + 1) * 1024)`` anchored at column 0 in ascending ``j`` and accumulates them
  elementwise into a ``[rows, 1024]`` float32 lane accumulator (the same step as the GPU's).
* The 1024 lane partials are combined by a fixed tree: halving adds ``acc[:, :w/2] + acc[:, w/2:]``
  for ``w = 1024, 512, 256`` (vreg-aligned, explicit), then the backend's reduction of the
  remaining 128 lanes (Mosaic's cross-lane reduce on a TPU; XLA's CPU reduce of ``[rows, 128]``
  in interpret mode).
* Derived ops use the same formulas as ``pallas_kernels/reductions.py``: ``mean = sum / N``,
  ``logsumexp = m + log(sum(exp(x - m)))`` (``m = max``, 0 when not finite),
  ``softmax = exp(x - m) * (1 / s)``, ``log_softmax = (x - m) - log(s)``,
  ``rms_norm = x * rsqrt(sum(x^2) / N + eps) * (offset + scale)``.

Where the TPU order differs from the GPU's
------------------------------------------
* Matmul: the K tile is 256 (GPU/interpret: 64), and the tile dot is the MXU's (bf16 multiply, f32
  accumulate; f32 as the multi-pass bf16 decomposition of ``Precision.HIGHEST``) instead of the
  tensor-core MMA k-steps / IEEE FMA chain. ``precision='tf32'`` has no TPU meaning and is rejected.
* Rows: the chunk walk is the same (1024 lanes, ascending), but the final 1024-lane tree is
  "three explicit halvings, then a 128-lane cross-lane reduce" instead of Triton's shuffle tree.
  Max needs no NaN counter here: TPU/XLA ``max`` propagates NaN.
* float16: Mosaic's f16 support varies by chip, so f16 inputs are converted to float32 in the
  wrapper (exact) and the result is rounded once to f16 in the wrapper. For row kernels this is the
  same arithmetic as an in-kernel upcast; for matmul the f16 products become exact f32 products
  under ``Precision.HIGHEST``.
* float64 is not supported (no f64 on the TPU).

So TPU bits differ from GPU and CPU-interpret bits; ``'tpu'`` and ``'tpu-interpret'`` share the
order but not necessarily the bits (the MXU and XLA's CPU dot round differently).

Every ``BlockSpec`` built here is checked with ``check_tpu_block_shape`` (interpret mode does not
enforce Mosaic's tiling rules, so a shape that would fail to lower on a TPU fails here first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend as _backend
from pallas_kernels._rows import round_up
from pallas_kernels.order import REDUCE_CHUNK

#: K tile of the TPU matmul (the unit of its ascending K accumulation).
TPU_BLOCK_K = 256
#: The one (M, N) output tile of the TPU matmul.
TPU_BLOCK_M = 128
TPU_BLOCK_N = 128
#: Lanes per vreg: the width the row-reduction tree halves down to before the cross-lane reduce.
TPU_LANES = 128

TPU_BACKENDS = ("tpu", "tpu-interpret")
OPS = ("sum", "mean", "max", "logsumexp", "softmax", "log_softmax", "rms_norm")
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

assert REDUCE_CHUNK % TPU_LANES == 0 and (REDUCE_CHUNK // TPU_LANES) & (REDUCE_CHUNK // TPU_LANES - 1) == 0


# ----------------------------------------------------------------------------------------------
# Block-shape rule.

def _sublane_multiple(dtype) -> int:
    """Second-to-last block dim multiple: 8 for 32-bit, 16 for 16-bit (packed), 32 for 8-bit."""
    return {4: 8, 2: 16, 1: 32}.get(jnp.dtype(dtype).itemsize, 8)


def check_tpu_block_shape(block_shape, array_shape, dtype, *, kernel: str = "detjax kernel"):
    """Raise ``ValueError`` unless ``block_shape`` obeys Mosaic TPU's tiling rule for ``array_shape``.

    The last block dim must be a multiple of 128 or equal the array's last dim; the second-to-last
    must be a multiple of 8 (32-bit; 16 for 16-bit, 32 for 8-bit dtypes) or equal the array's dim.
    ``None`` (a squeezed dim) counts as a block dim of 1. Leading dims are unconstrained.
    """
    block_shape, array_shape = tuple(block_shape), tuple(array_shape)
    if len(block_shape) != len(array_shape):
        raise ValueError(f"{kernel}: block shape {block_shape} has rank {len(block_shape)} but the "
                         f"array {array_shape} has rank {len(array_shape)}")
    dt = jnp.dtype(dtype)
    blk = tuple(1 if b is None else int(b) for b in block_shape)
    for b, a in zip(blk, array_shape):
        if b <= 0 or b > a and a > 0:
            raise ValueError(f"{kernel}: block shape {block_shape} does not fit in array {array_shape}")
    rules = [(-1, 128, "a multiple of 128")]
    if len(blk) >= 2:
        sub = _sublane_multiple(dt)
        rules.append((-2, sub, f"a multiple of {sub} (for {dt.name})"))
    for axis, mult, what in rules:
        b, a = blk[axis], array_shape[axis]
        if b != a and b % mult != 0:
            raise ValueError(
                f"{kernel}: block shape {block_shape} for array {array_shape} ({dt.name}) breaks the "
                f"Mosaic TPU tiling rule: block dim {axis} is {b}, which must be {what} or equal the "
                f"array dim {a}")


def _spec(block_shape, index_map, array_shape, dtype, kernel):
    check_tpu_block_shape(block_shape, array_shape, dtype, kernel=kernel)
    return pl.BlockSpec(block_shape, index_map)


def _resolve(backend):
    be = _backend.resolve(backend)
    if be not in TPU_BACKENDS:
        raise ValueError(f"pallas_kernels.tpu runs only on backends {TPU_BACKENDS}; got {be!r}")
    return be


def _compiler_params(be, semantics):
    # jax 0.11.2's TPU interpreter zips dimension_semantics with the grid without skipping the grid
    # axes that vmap prepends (interpret_pallas_call._get_randomized_grid_coordinates), so a vmapped
    # call fails there; Mosaic's own lowering does skip them. In interpret mode the semantics only
    # steer grid-order randomisation (off: no random_seed), so they are left out there. The order
    # of the 'arbitrary' K axis is sequential either way.
    if be == "tpu-interpret":
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _check_dtype(dtype, what):
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
        raise TypeError(f"{what}: dtype {jnp.dtype(dtype).name} is not supported on the TPU backends "
                        f"(bfloat16, float16, float32)")


# ----------------------------------------------------------------------------------------------
# Matmul.

def _matmul_kernel(a_ref, b_ref, o_ref, acc_ref, *, transpose_b, precision):
    k = pl.program_id(3)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], dims, precision=precision,
                                    preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul_kernel_call(a, b, *, transpose_b=False, out_dtype=None, precision="highest",
                       backend=None, config=None):
    """Fixed-order TPU matmul: ``a [B, M, K]`` @ ``b [B, K, N]`` (``[B, N, K]`` if ``transpose_b``).

    ``b`` may have batch 1 (one weight shared by every batch element). ``config`` is accepted for
    signature compatibility with the GPU entry point and must be ``None``: the TPU tile is fixed.
    Returns ``[B, M, N]`` in ``out_dtype`` (default ``a.dtype``).
    """
    be = _resolve(backend)
    if config is not None:
        raise ValueError("the TPU matmul has one fixed tile "
                         f"({TPU_BLOCK_M}, {TPU_BLOCK_N}, {TPU_BLOCK_K}); config must be None")
    if precision not in ("highest",):
        raise ValueError(f"precision={precision!r}: the TPU matmul supports only 'highest' "
                         "(tf32 does not exist on the TPU)")
    _check_dtype(a.dtype, "detjax_tpu_matmul")
    _check_dtype(b.dtype, "detjax_tpu_matmul")
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    B, M, K = a.shape
    N = b.shape[1] if transpose_b else b.shape[2]
    Bb = b.shape[0]
    if Bb not in (1, B):
        raise ValueError(f"detjax_tpu_matmul: b batch {Bb} must be 1 or {B}")
    # f16 -> f32 in the wrapper (exact); see the module docstring.
    if a.dtype == jnp.float16:
        a = a.astype(jnp.float32)
    if b.dtype == jnp.float16:
        b = b.astype(jnp.float32)
    kernel_out = jnp.float32 if out_dtype == jnp.float16 else out_dtype
    bm, bn, bk = TPU_BLOCK_M, TPU_BLOCK_N, TPU_BLOCK_K
    Mp, Np, Kp = round_up(max(M, 1), bm), round_up(max(N, 1), bn), round_up(max(K, 1), bk)
    if (Mp, Kp) != (M, K):
        a = jnp.pad(a, ((0, 0), (0, Mp - M), (0, Kp - K)))
    if transpose_b:
        if (Np, Kp) != (N, K):
            b = jnp.pad(b, ((0, 0), (0, Np - N), (0, Kp - K)))
        b_block = (None, bn, bk)
        b_map = (lambda bi, i, j, k: (bi, j, k)) if Bb == B else (lambda bi, i, j, k: (0, j, k))
    else:
        if (Kp, Np) != (K, N):
            b = jnp.pad(b, ((0, 0), (0, Kp - K), (0, Np - N)))
        b_block = (None, bk, bn)
        b_map = (lambda bi, i, j, k: (bi, k, j)) if Bb == B else (lambda bi, i, j, k: (0, k, j))
    name = "detjax_tpu_matmul"
    in_specs = [_spec((None, bm, bk), lambda bi, i, j, k: (bi, i, k), a.shape, a.dtype, name),
                _spec(b_block, b_map, b.shape, b.dtype, name)]
    out_spec = _spec((None, bm, bn), lambda bi, i, j, k: (bi, i, j), (B, Mp, Np), kernel_out, name)
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 or b.dtype == jnp.float32 else None
    kernel = functools.partial(_matmul_kernel, transpose_b=transpose_b, precision=prec)
    out = pl.pallas_call(
        kernel,
        grid=(B, Mp // bm, Np // bn, Kp // bk),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((B, Mp, Np), kernel_out),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_compiler_params(be, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_backend.interpret_arg(be),
        name=name,
    )(a, b)
    if (Mp, Np) != (M, N):
        out = out[:, :M, :N]
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Row reductions.

def row_block(dtype) -> int:
    """Rows per program: 8 for 32-bit data, 16 for 16-bit (one packed vreg of sublanes)."""
    return _sublane_multiple(dtype)


def _tree(acc, combine, reduce):
    """The fixed lane tree: explicit halvings down to 128 lanes, then one 128-lane reduce."""
    w = acc.shape[-1]
    while w > TPU_LANES:
        w //= 2
        acc = combine(acc[:, :w], acc[:, w:])
    return reduce(acc, axis=-1, keepdims=True)  # [rows, 1]


def _chunk_loop(n_chunks, interpret):
    # On the CPU interpreter a loop of static trip count can be unrolled and fused differently per
    # length (see backend.opaque_trip_count); read the bound through a program id there.
    return _backend.opaque_trip_count(n_chunks) if interpret else n_chunks


def _lane_reduce(x_ref, n_chunks, interpret, fn, combine, init):
    rows = x_ref.shape[0]

    def body(j, acc):
        v = x_ref[:, pl.ds(pl.multiple_of(j * REDUCE_CHUNK, REDUCE_CHUNK), REDUCE_CHUNK)]
        return combine(acc, fn(v.astype(jnp.float32)))

    acc = lax.fori_loop(0, _chunk_loop(n_chunks, interpret), body,
                        jnp.full((rows, REDUCE_CHUNK), init, jnp.float32))
    return acc


def _lane_sum(x_ref, n_chunks, interpret, fn=lambda v: v):
    acc = _lane_reduce(x_ref, n_chunks, interpret, fn, lambda p, q: p + q, 0.0)
    return _tree(acc, lambda p, q: p + q, jnp.sum)


def _lane_max(x_ref, n_chunks, interpret):
    acc = _lane_reduce(x_ref, n_chunks, interpret, lambda v: v, jnp.maximum, -jnp.inf)
    return _tree(acc, jnp.maximum, jnp.max)


def _safe_max(m):
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def _tpu_row_kernel(*refs, op, n, n_chunks, eps, offset, interpret):
    if op == "rms_norm":
        x_ref, w_ref, o_ref = refs
    else:
        x_ref, o_ref = refs

    def chunks():
        return _chunk_loop(n_chunks, interpret)

    def cs(j):
        return pl.ds(pl.multiple_of(j * REDUCE_CHUNK, REDUCE_CHUNK), REDUCE_CHUNK)

    if op in ("sum", "mean"):
        total = _lane_sum(x_ref, n_chunks, interpret)
        if op == "mean":
            total = total / n
        o_ref[...] = jnp.broadcast_to(total, o_ref.shape).astype(o_ref.dtype)
        return
    if op == "max":
        o_ref[...] = jnp.broadcast_to(_lane_max(x_ref, n_chunks, interpret), o_ref.shape).astype(o_ref.dtype)
        return
    if op == "rms_norm":
        ss = _lane_sum(x_ref, n_chunks, interpret, lambda v: v * v)
        r = lax.rsqrt(ss / n + eps)  # [rows, 1]

        @pl.loop(0, chunks())
        def _(j):
            v = x_ref[:, cs(j)].astype(jnp.float32)
            w = w_ref[:, cs(j)].astype(jnp.float32)
            o_ref[:, cs(j)] = ((v * r) * (offset + w)).astype(o_ref.dtype)
        return

    m = _lane_max(x_ref, n_chunks, interpret)  # [rows, 1]
    if op == "logsumexp":  # softmax keeps the raw max (+inf -> NaN), as on the GPU
        m = _safe_max(m)
    s = _lane_sum(x_ref, n_chunks, interpret, lambda v: jnp.exp(v - m))
    if op == "logsumexp":
        o_ref[...] = jnp.broadcast_to(m + jnp.log(s), o_ref.shape).astype(o_ref.dtype)
        return
    log_s = jnp.log(s)
    inv_s = 1 / s

    @pl.loop(0, chunks())
    def _(j):
        v = x_ref[:, cs(j)].astype(jnp.float32)
        y = jnp.exp(v - m) * inv_s if op == "softmax" else (v - m) - log_s
        o_ref[:, cs(j)] = y.astype(o_ref.dtype)


_PAD = {"sum": 0.0, "mean": 0.0, "rms_norm": 0.0, "max": -jnp.inf,
        "logsumexp": -jnp.inf, "softmax": -jnp.inf, "log_softmax": -jnp.inf}


def row_reduce(x, op: str, *, weight=None, eps: float = 1e-6, offset: float = 1.0,
               out_dtype=None, backend=None):
    """Fixed-order TPU row kernel on ``x: [R, N]`` (same contract as ``reductions.row_reduce``).

    ``sum``/``mean``/``max``/``logsumexp`` return ``[R]``; ``softmax``/``log_softmax``/``rms_norm``
    return ``[R, N]``. ``weight`` (``[N]``) is RMSNorm's scale.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {OPS}")
    be = _resolve(backend)
    _check_dtype(x.dtype, f"detjax_tpu_row_{op}")
    if op == "rms_norm":
        if weight is None:
            raise ValueError("rms_norm needs weight=[N]")
        _check_dtype(weight.dtype, "detjax_tpu_row_rms_norm")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    R, N = x.shape
    if x.dtype == jnp.float16:  # exact; the kernel computes in f32 anyway
        x = x.astype(jnp.float32)
    if weight is not None and weight.dtype == jnp.float16:
        weight = weight.astype(jnp.float32)
    kernel_out = jnp.float32 if out_dtype == jnp.float16 else out_dtype
    # Rows per program: satisfy the packing rule for both the input and the output dtype.
    rb = max(row_block(x.dtype), row_block(kernel_out))
    Rp = round_up(max(R, 1), rb)
    Np = round_up(max(N, 1), REDUCE_CHUNK)
    if Np != N:
        x = jnp.pad(x, ((0, 0), (0, Np - N)), constant_values=_PAD[op])
    if Rp != R:
        x = jnp.pad(x, ((0, Rp - R), (0, 0)))
    name = f"detjax_tpu_row_{op}"
    in_specs = [_spec((rb, Np), lambda r: (r, 0), x.shape, x.dtype, name)]
    args = [x]
    if op == "rms_norm":
        w = jnp.pad(weight.reshape(1, N), ((0, 0), (0, Np - N)))
        in_specs.append(_spec((1, Np), lambda r: (0, 0), w.shape, w.dtype, name))
        args.append(w)
    elementwise = op in ("softmax", "log_softmax", "rms_norm")
    if elementwise:
        out_shape = (Rp, Np)
        out_spec = _spec((rb, Np), lambda r: (r, 0), out_shape, kernel_out, name)
    else:  # one scalar per row, broadcast over a lane-dense [rb, 128] tile
        out_shape = (Rp, TPU_LANES)
        out_spec = _spec((rb, TPU_LANES), lambda r: (r, 0), out_shape, kernel_out, name)
    kernel = functools.partial(_tpu_row_kernel, op=op, n=N, n_chunks=Np // REDUCE_CHUNK, eps=eps,
                               offset=offset, interpret=_backend.is_interpret(be))
    out = pl.pallas_call(
        kernel,
        grid=(Rp // rb,),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, kernel_out),
        compiler_params=_compiler_params(be, ("parallel",)),
        interpret=_backend.interpret_arg(be),
        name=name,
    )(*args)
    out = out[:R, :N] if elementwise else out[:R, 0]
    return out.astype(out_dtype)
