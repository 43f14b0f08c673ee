"""``detjax.deterministic``: make an unmodified JAX / Flax function batch-invariant.

``deterministic(fn)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``) and evaluates that jaxpr with an
interpreter that replaces every primitive whose floating-point result depends on a reduction order
by a detjax fixed-order op:

====================================  ==========================================================
``dot_general`` (float)               ``detjax.ops.dot_general``
``reduce_sum`` (float)                ``detjax.ops.sum``
``reduce_max`` / ``reduce_min``       ``detjax.ops.max`` / ``detjax.ops.min``
``argmax`` / ``argmin`` (float)       ``detjax.ops.argmax`` / ``detjax.ops.argmin``
``cumsum`` / ``cumlogsumexp`` /       ``detjax.ops._scan.cumsum`` / ``cumlogsumexp`` /
``cummax`` / ``cummin`` (float)       ``cummax`` / ``cummin``
====================================  ==========================================================

Before that, patterns are recognised in the jaxpr (flattened through ``jit`` calls) and run as one
fused detjax kernel each: attention (``dot_general`` -> scale / soft cap -> interval mask ->
softmax -> ``dot_general``) on the attention kernel, RMSNorm on the ``rms_norm`` row kernel, and
projections of one activation by several weights in one launch; a transcendental op is isolated
together with its elementwise neighbours (``detjax/_fusion.py`` says what is recognised and what
the fused kernels do differently; ``fuse=False`` turns all of this off).

Everything elementwise, data movement, and every integer/bool reduction (exact in any order) is left
to XLA. Control flow is rebuilt around the transformed bodies: ``jit``/``closed_call``
(inlined), ``remat`` (``jax.checkpoint`` of the interpreted body), ``scan``/``while``/``cond``
(``lax.scan``/``lax.while_loop``/``lax.switch`` of closures running the interpreter),
``custom_jvp_call``/``custom_vjp_call`` (kept as is when their body needs no replacement, otherwise
their primal body is interpreted and differentiated through the detjax ops' own ``custom_vjp``
rules; the user's custom derivative rule is then not used).

Primitives whose result depends on an order detjax cannot fix (convolutions, float scatter-add with
possibly repeated indices, float ``reduce_prod``/``cumprod``, ``reduce_window`` sums, linear
algebra decompositions, FFTs, collectives, callbacks / foreign calls, and any primitive not known
to be safe) raise ``NondeterministicOpError`` in strict mode (the default), naming the primitive,
its operand shapes/dtypes and the user's source line; with ``strict=False`` they warn once per
primitive and run on XLA.

Composes with ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (outside, and inside ``fn``).
``deterministic(fn).explain(*args)`` reports what was replaced / left / unsupported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core
from jax._src import source_info_util

from detjax import _fusion
from detjax.ops import _linalg, _reductions, _scan

__all__ = ["deterministic", "wrap", "NondeterministicOpError", "Explanation",
           "DeterministicModule"]


class NondeterministicOpError(ValueError):
    """An op whose result depends on a reduction order detjax cannot fix (strict mode)."""


# ---------------------------------------------------------------------------------------------
# Classification of primitives.

#: Elementwise / data-movement / exact primitives: XLA's result does not depend on any order.
SAFE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e bitcast_convert_type
broadcast_in_dim cbrt ceil clamp clz complex concatenate conj convert_element_type copy copy_p cos
cosh digamma div dynamic_slice dynamic_update_slice eq erf erf_inv erfc exp exp2 expm1 floor gather
ge gt igamma igamma_grad_a igammac imag integer_pow iota is_finite le lgamma log log1p logistic lt
max min mul ne neg nextafter not or pad polygamma population_count pow random_bits random_fold_in
random_gamma_grad random_seed random_split random_unwrap random_wrap real reduce_and reduce_or
reduce_precision reduce_xor regularized_incomplete_beta rem reshape rev round rsqrt select_n
shift_left shift_right_arithmetic shift_right_logical sign sin sinh slice sort sqrt square squeeze
stop_gradient sub tan tanh threefry2x32 top_k transpose xor zeta expand_dims split
optimization_barrier sharding_constraint device_put mesh_cast reshard name pvary
reduce_window_max reduce_window_min argsort platform_index empty add_any broadcast_to stack
unstack tile zeros_like create_token after_all dim_as_value dimension_size eq_to le_to lt_to
iota_2x32_shape log2 mulhi one_minus_square philox2x32 philox4x32 threefry4x32 random_clone
rng_bit_generator random_gamma shape_assertion debug_print inspect_sharding layout_constraint
to_edtype from_edtype empty2
""".split())

#: Known order-dependent primitives with no fixed-order replacement (strict error), with a reason.
UNSUPPORTED = {
    "conv_general_dilated": "convolution accumulation order is chosen by XLA/cuDNN",
    "reduce_prod": "float product reduction order is chosen by XLA",
    "cumprod": "float cumulative product order is chosen by XLA",
    "reduce_window_sum": "windowed float sum order is chosen by XLA",
    "reduce_window": "generic windowed reduction order is chosen by XLA",
    "select_and_scatter_add": "overlapping-window gradient accumulation order is chosen by XLA",
    "select_and_gather_add": "windowed reduction order is chosen by XLA",
    "scatter-add": "float scatter-add with possibly repeated indices accumulates in arbitrary order",
    "scatter_add": "float scatter-add with possibly repeated indices accumulates in arbitrary order",
    "scatter-mul": "float scatter-mul with possibly repeated indices accumulates in arbitrary order",
    "scatter_mul": "float scatter-mul with possibly repeated indices accumulates in arbitrary order",
    "scatter-sub": "float scatter-sub with possibly repeated indices accumulates in arbitrary order",
    "scatter_sub": "float scatter-sub with possibly repeated indices accumulates in arbitrary order",
    "scatter": "scatter with possibly repeated indices: which update wins is unspecified",
    "ragged_dot": "grouped matmul accumulation order is chosen by XLA",
    "ragged_dot_general": "grouped matmul accumulation order is chosen by XLA",
    "fft": "FFT order is chosen by XLA/cuFFT",
    "cholesky": "decomposition order is chosen by XLA/cuSOLVER",
    "eigh": "decomposition order is chosen by XLA/cuSOLVER",
    "eig": "decomposition order is chosen by XLA",
    "svd": "decomposition order is chosen by XLA/cuSOLVER",
    "qr": "decomposition order is chosen by XLA",
    "householder_product": "decomposition order is chosen by XLA",
    "lu": "decomposition order is chosen by XLA/cuSOLVER",
    "lu_pivots_to_permutation": "part of an LU decomposition",
    "triangular_solve": "solve order is chosen by XLA/cuBLAS",
    "tridiagonal_solve": "solve order is chosen by XLA",
    "schur": "decomposition order is chosen by XLA",
    "hessenberg": "decomposition order is chosen by XLA",
    "tridiagonal": "decomposition order is chosen by XLA",
    "psum": "collective reduction order is chosen by the communication library",
    "psum_invariant": "collective reduction order is chosen by the communication library",
    "pmax": "collective", "pmin": "collective", "pmean": "collective",
    "all_gather": "collective", "all_to_all": "collective", "ppermute": "collective",
    "reduce_scatter": "collective", "psum_scatter": "collective", "axis_index": "collective",
    "xla_pmap": "pmap is not traced through", "shard_map": "shard_map is not traced through",
    "pure_callback": "host callback (opaque)", "io_callback": "host callback (opaque)",
    "debug_callback": "host callback (opaque)", "ffi_call": "foreign call (opaque)",
    "custom_call": "foreign call (opaque)", "custom_transpose_call": "opaque custom rule",
    "custom_lin": "linearized custom rule (opaque)",
    "custom_linear_solve": "iterative/linear solve order is chosen by XLA",
    "reduce": "generic (variadic) reduction order is chosen by XLA",
    "approx_top_k": "approximate top-k is order-dependent",
    "scaled_dot": "accumulation order is chosen by XLA", "scaled_matmul": "cuDNN kernel",
    "dot_product_attention_fwd": "cuDNN attention kernel",
    "dot_product_attention_bwd": "cuDNN attention kernel",
    "cudnn_fusion": "cuDNN kernel",
}

_REPLACED = ("dot_general", "reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin",
             "cumsum", "cumlogsumexp", "cummax", "cummin")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "remat",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "scan", "while", "cond")

_DETJAX_KERNEL_PREFIX = "detjax_"


def _rsqrt_fixed(x):
    # XLA:CPU lowers rsqrt (and 1/sqrt, which its simplifier turns into rsqrt) to an approximation
    # in the vectorised loop body and to 1/sqrtf in the scalar tail, so the bits of an element
    # depended on its position in the flattened array (measured: [7,5,1] vs [1,5,1]). sqrt and
    # divide are correctly rounded everywhere; the barrier stops the rewrite back to rsqrt.
    return 1 / lax.optimization_barrier(jnp.sqrt(x))


def _atan_fixed(x):
    # Same lane dependence measured for XLA:CPU's atan (not for atan2).
    return jnp.arctan2(x, lax.optimization_barrier(jnp.ones_like(x)))


#: Elementwise primitives whose XLA:CPU lowering was measured to depend on an element's position
#: (vector body vs scalar tail); evaluated with a position-independent formula instead.
_LANE_FIXES = {
    "rsqrt": (_rsqrt_fixed, "1/sqrt: XLA:CPU's vectorised rsqrt differs from its scalar tail"),
    "sqrt": (lambda x: lax.optimization_barrier(jnp.sqrt(x)),
             "sqrt behind a barrier: stops XLA rewriting 1/sqrt into its lane-dependent rsqrt"),
    "atan": (_atan_fixed, "atan2(x, 1): XLA:CPU's vectorised atan differs from its scalar tail"),
}


#: Transcendental elementwise primitives. Their XLA:GPU code was measured to change with the fusion
#: around them: a ``tanh`` fused between two detjax kernels gave other bits for a row alone than
#: inside a batch on the H100, while the same ``tanh`` alone, or behind optimization barriers, was
#: batch-invariant (results/2026-11-22-h100, run 9). Each is therefore evaluated in a fusion of its
#: own: barriers on its inputs and output. (Correctly rounded ops - add, mul, div, sqrt - and
#: data movement are left to fuse.)
_ISOLATED = frozenset("""
exp exp2 expm1 log log1p tanh logistic erf erfc erf_inv sin cos tan asin acos atan2 sinh cosh
asinh acosh atanh pow cbrt lgamma digamma
""".split())


def _is_isolation_seed(eqn) -> bool:
    return eqn.primitive.name in _ISOLATED and _is_float(eqn.outvars[0])


def _isolate(fn, *args):
    from detjax.ops import isolated
    return isolated(fn, *args)


def _isolated(eqn, invals):
    from detjax.ops import isolated
    params = eqn.primitive.get_bind_params(eqn.params)
    return isolated(lambda *a: eqn.primitive.bind(*a, **params), *invals)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.aval.dtype if hasattr(x, "aval") else x.dtype, jnp.floating)


def _describe(v) -> str:
    aval = v.aval
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None:
        return str(aval)
    return f"{jnp.dtype(dtype).name}{list(shape)}" if dtype is not None else str(aval)


def _source(eqn) -> str:
    try:
        return source_info_util.summarize(eqn.source_info) or "<no user frame>"
    except Exception:  # pragma: no cover - source info is best effort
        return "<unknown source>"


@dataclasses.dataclass(frozen=True)
class Record:
    primitive: str
    shapes: tuple
    source: str
    note: str = ""

    def __iter__(self):  # unpacks as (primitive, shapes, source line)
        return iter((self.primitive, self.shapes, self.source))

    def __str__(self):
        s = f"{self.primitive}({', '.join(self.shapes)}) at {self.source}"
        return s + (f"  [{self.note}]" if self.note else "")


@dataclasses.dataclass
class Explanation:
    """What ``deterministic`` does to a function: ``replaced``, ``left`` and ``unsupported`` lists of
    ``Record(primitive, shapes, source)`` (each unpacks as a 3-tuple)."""
    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    unsupported: list = dataclasses.field(default_factory=list)
    fused: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"detjax.deterministic: {len(self.fused)} fused, {len(self.replaced)} replaced, "
                 f"{len(self.left)} left to XLA, {len(self.unsupported)} unsupported"]
        for title, recs, hint in (
                ("Fused (a pattern of primitives run as one detjax kernel)", self.fused, ""),
                ("Replaced by fixed-order detjax kernels", self.replaced, ""),
                ("Left to XLA (elementwise, data movement, or exact integer/bool reductions)",
                 self.left, ""),
                ("UNSUPPORTED (order-dependent, no fixed-order kernel; strict mode raises)",
                 self.unsupported, "")):
            lines.append(f"{title}:")
            if recs is self.left:  # many: one line per primitive with a count
                counts: dict = {}
                for r in recs:
                    counts.setdefault((r.primitive, r.note), []).append(r)
                lines.extend(f"  {p} x{len(rs)}" + (f"  [{n}]" if n else "")
                             for (p, n), rs in counts.items())
            else:
                lines.extend(f"  {r}" for r in recs)
            if not recs:
                lines.append("  (none)")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------
# The interpreter.

class _Interpreter:
    def __init__(self, strict: bool, backend, explain: Explanation | None = None,
                 fuse: bool = True):
        self.strict = strict
        self.backend = backend
        self.explain = explain
        self.fuse = fuse
        self.warned: set = set()
        self.ctx: list = []  # source lines of the enclosing call equations
        self.callsite: dict = {}  # id(inlined eqn) -> source line of the call it was inlined from

    # -- bookkeeping --------------------------------------------------------------------------
    def _src(self, eqn) -> str:
        s = _source(eqn)
        if s == "<no user frame>":
            # inside a library jit (jnp.fft, linalg, ...): the caller's line
            if id(eqn) in self.callsite:
                return self.callsite[id(eqn)]
            if self.ctx:
                return self.ctx[-1]
        return s

    def _record(self, kind, eqn, note=""):
        if self.explain is None:
            return
        rec = Record(eqn.primitive.name, tuple(_describe(v) for v in eqn.invars), self._src(eqn),
                     note)
        getattr(self.explain, kind).append(rec)

    def _unsupported(self, eqn, reason, invals):
        name = eqn.primitive.name
        shapes = ", ".join(_describe(v) for v in eqn.invars)
        if self.explain is not None:
            self._record("unsupported", eqn, reason)
        elif self.strict:
            raise NondeterministicOpError(
                f"detjax.deterministic: primitive '{name}' with operands ({shapes}) at "
                f"{self._src(eqn)} has no fixed-order implementation ({reason}); its result may "
                "depend on batch size or run. Rewrite it, or pass strict=False to run it on XLA "
                "with a warning.")
        elif name not in self.warned:
            self.warned.add(name)
            warnings.warn(
                f"detjax.deterministic(strict=False): primitive '{name}' with operands ({shapes}) at "
                f"{self._src(eqn)} runs on XLA and may not be batch-invariant ({reason})",
                stacklevel=4)
        return self._bind(eqn, invals)

    # -- evaluation ---------------------------------------------------------------------------
    def _inline_custom(self, eqn) -> bool:
        """Whether a custom-derivative call is evaluated through its body (see ``_call``)."""
        return self._needs_rewrite(eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))

    def _fusions(self, jaxpr, consts):
        """The jaxpr flattened through calls, and its fused patterns (``detjax._fusion``)."""
        flat = _fusion.flatten(jaxpr, self._inline_custom, _source, self.callsite)
        return flat, _fusion.find_fusions(flat, _resolved(self.backend), consts)

    def eval_jaxpr(self, jaxpr, consts, *args):
        env: dict = {}
        fusions: dict = {}
        clusters: dict = {}
        if self.fuse:
            jaxpr, fusions = self._fusions(jaxpr, consts)
        inside = frozenset().union(*(f.interior for f in fusions.values()))
        if self.fuse:
            clusters = _fusion.find_clusters(jaxpr, _is_isolation_seed, inside)
            inside = inside.union(*(c.members for c in clusters.values()))

        def read(v):
            return v.val if isinstance(v, _core.Literal) else env[v]

        def write(v, val):
            if not isinstance(v, _core.DropVar):
                env[v] = val

        for v, c in zip(jaxpr.constvars, consts):
            write(v, c)
        for v, a in zip(jaxpr.invars, args):
            write(v, a)
        for i, eqn in enumerate(jaxpr.eqns):
            if i in fusions:
                f = fusions[i]
                if self.explain is not None:
                    self.explain.fused.append(Record(f.kind, (), self._src(eqn), f.note))
                with _user_context(eqn):
                    out = f.run(read, _resolved(self.backend))
                if f.outvars:
                    for v, o in zip(f.outvars, out):
                        write(v, o)
                else:
                    write(eqn.outvars[0], out)
                continue
            if i in clusters:
                c = clusters[i]
                for j in c.seeds:
                    self._record("replaced", jaxpr.eqns[j],
                                 f"isolated with its elementwise neighbours ({len(c.members)} ops) "
                                 "in one fusion of its own")
                with _user_context(eqn):
                    write(c.output, c.run(read, jaxpr.eqns, _isolate))
                continue
            if i in inside:
                continue  # part of a fused pattern; its value is used only inside the pattern
            invals = [read(v) for v in eqn.invars]
            with _user_context(eqn):
                outs = self.eval_eqn(eqn, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, o in zip(eqn.outvars, outs):
                write(v, o)
        return [read(v) for v in jaxpr.outvars]

    def eval_closed(self, closed, *args):
        jaxpr, consts = _open(closed)
        return self.eval_jaxpr(jaxpr, consts, *args)

    @staticmethod
    def _bind(eqn, invals):
        params = eqn.primitive.get_bind_params(eqn.params)
        return eqn.primitive.bind(*invals, **params)

    def eval_eqn(self, eqn, invals):
        name = eqn.primitive.name
        p = eqn.params
        be = self.backend
        if name in _REPLACED:
            return self._replace(eqn, name, p, invals, be)
        if name in _LANE_FIXES and _is_float(eqn.invars[0]):
            self._record("replaced", eqn, _LANE_FIXES[name][1])
            return _LANE_FIXES[name][0](*invals)
        if name in _ISOLATED and _is_float(eqn.outvars[0]):
            self._record("replaced", eqn, "isolated in its own fusion (XLA:GPU's code for it "
                                          "changed with the surrounding fusion)")
            return _isolated(eqn, invals)
        if name in _CALLS:
            self.ctx.append(self._src(eqn))
            try:
                return self._call(eqn, name, p, invals)
            finally:
                self.ctx.pop()
        if name == "pallas_call":
            kname = str(p.get("name_and_src_info", p.get("name", "")))
            if kname.startswith(_DETJAX_KERNEL_PREFIX):
                self._record("left", eqn, "detjax kernel")
                return self._bind(eqn, invals)
            return self._unsupported(eqn, "foreign Pallas kernel (order unknown)", invals)
        if name in ("scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter_sub",
                    "scatter-sub", "scatter", "scatter-max", "scatter-min"):
            operand, indices = eqn.invars[0], eqn.invars[1]
            n_updates = _num_scatter_indices(indices.aval, p)
            exact = (name in ("scatter-max", "scatter-min")
                     or (name != "scatter" and not _is_float(operand)))
            if p.get("unique_indices") or n_updates <= 1 or exact:
                self._record("left", eqn, "unique indices" if not exact else "integer: exact")
                return self._bind(eqn, invals)
            return self._unsupported(eqn, UNSUPPORTED[name], invals)
        if name in UNSUPPORTED:
            return self._unsupported(eqn, UNSUPPORTED[name], invals)
        if name in SAFE:
            note = ("exact integer/bool reduction" if name.startswith("reduce_") else "")
            self._record("left", eqn, note)
            return self._bind(eqn, invals)
        return self._unsupported(eqn, "unknown primitive: not known to be order-independent",
                                 invals)

    # -- replacements -------------------------------------------------------------------------
    def _replace(self, eqn, name, p, invals, be):
        if not all(_is_float(v) for v in eqn.invars):
            self._record("left", eqn, "integer/bool: exact in any order")
            return self._bind(eqn, invals)
        self._record("replaced", eqn)
        x = invals[0]
        if name == "dot_general":
            return _linalg.dot_general(invals[0], invals[1], p["dimension_numbers"],
                                       precision=p.get("precision"),
                                       preferred_element_type=p.get("preferred_element_type"),
                                       backend=be)
        if name == "reduce_sum":
            return _reductions.sum(x, axis=tuple(p["axes"]), backend=be)
        if name == "reduce_max":
            return _reductions.max(x, axis=tuple(p["axes"]), backend=be)
        if name == "reduce_min":
            return _reductions.min(x, axis=tuple(p["axes"]), backend=be)
        if name in ("argmax", "argmin"):
            (ax,) = p["axes"]
            f = _reductions.argmax if name == "argmax" else _reductions.argmin
            return f(x, axis=int(ax), backend=be).astype(p["index_dtype"])
        f = {"cumsum": _scan.cumsum, "cumlogsumexp": _scan.cumlogsumexp, "cummax": _scan.cummax,
             "cummin": _scan.cummin}[name]
        return f(x, axis=p["axis"], reverse=p["reverse"], backend=be)

    # -- calls and control flow ---------------------------------------------------------------
    def _needs_rewrite(self, closed) -> bool:
        """Whether a sub-jaxpr holds any primitive this interpreter would not bind as is."""
        jaxpr, _ = _open(closed)
        for e in jaxpr.eqns:
            n = e.primitive.name
            if n in _REPLACED:
                if all(_is_float(v) for v in e.invars):
                    return True
            elif n in _LANE_FIXES:
                if _is_float(e.invars[0]):
                    return True
            elif n in _ISOLATED:
                if _is_float(e.outvars[0]):
                    return True
            elif n in _CALLS:
                for sub in _subjaxprs(e):
                    if self._needs_rewrite(sub):
                        return True
            elif n == "pallas_call":
                kname = str(e.params.get("name_and_src_info", e.params.get("name", "")))
                if not kname.startswith(_DETJAX_KERNEL_PREFIX):
                    return True
            elif n not in SAFE:
                return True
        return False

    def _call(self, eqn, name, p, invals):
        if name in ("jit", "pjit", "closed_call", "core_call"):
            sub = p.get("jaxpr", p.get("call_jaxpr"))
            return self.eval_closed(sub, *invals)
        if name in ("remat2", "checkpoint", "remat"):
            jaxpr = p["jaxpr"]
            fn = jax.checkpoint(lambda *a: self.eval_closed(jaxpr, *a),
                                prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
            return fn(*invals)
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            sub = p.get("call_jaxpr", p.get("fun_jaxpr"))
            if not self._needs_rewrite(sub):
                # Nothing to replace inside: keep the user's derivative rule.
                self._walk_left(sub)
                return self._bind(eqn, invals)
            return self.eval_closed(sub, *invals)
        if name == "scan":
            return self._scan(p, invals)
        if name == "while":
            return self._while(p, invals)
        if name == "cond":
            return self._cond(p, invals)
        raise AssertionError(name)  # pragma: no cover

    def _walk_left(self, closed):
        """Record the primitives of a body kept as is (explain mode only)."""
        if self.explain is None:
            return
        jaxpr, _ = _open(closed)
        for e in jaxpr.eqns:
            if e.primitive.name in _CALLS:
                for sub in _subjaxprs(e):
                    self._walk_left(sub)
            else:
                self._record("left", e)

    def _scan(self, p, invals):
        consts, carry, xs = (list(t) for t in p["ft_in"].update(list(invals)).unpack())
        nc, ncarry = len(consts), len(carry)
        body_jaxpr = p["jaxpr"]

        def body(c, x):
            outs = self.eval_closed(body_jaxpr, *consts, *c, *(x or ()))
            return list(outs[:ncarry]), list(outs[ncarry:])

        carry_out, ys = lax.scan(body, list(carry), list(xs) if xs else None, length=p["length"],
                                 reverse=p["reverse"], unroll=p.get("unroll", 1))
        del nc
        return list(carry_out) + list(ys)

    def _while(self, p, invals):
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]

        def cond_fn(c):
            return self.eval_closed(p["cond_jaxpr"], *cconsts, *c)[0]

        def body_fn(c):
            return list(self.eval_closed(p["body_jaxpr"], *bconsts, *c))

        return list(lax.while_loop(cond_fn, body_fn, list(init)))

    def _cond(self, p, invals):
        index, ops = invals[0], invals[1:]
        branches = [functools.partial(self._branch, br) for br in p["branches"]]
        if len(branches) == 1:
            return branches[0](*ops)
        return list(lax.switch(index, branches, *ops))

    def _branch(self, br, *ops):
        return list(self.eval_closed(br, *ops))


def _user_context(eqn):
    """Ops traced while evaluating ``eqn`` carry its source line (errors and ``explain`` name it)."""
    return source_info_util.user_context(eqn.source_info.traceback,
                                         name_stack=eqn.source_info.name_stack)


def _resolved(backend):
    from pallas_kernels import backend as _backend
    return _backend.resolve(backend)


def _open(j):
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr, j.consts
    return j, []


def _subjaxprs(eqn):
    p = eqn.params
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr", "cond_jaxpr", "body_jaxpr"):
        if k in p and p[k] is not None and hasattr(_open(p[k])[0], "eqns"):
            yield p[k]
    for br in p.get("branches", ()):
        yield br


def _num_scatter_indices(idx_aval, params):
    dn = params.get("dimension_numbers")
    ivd = getattr(dn, "index_vector_dim", None)
    shape = list(idx_aval.shape)
    if ivd is not None and ivd < len(shape):
        shape.pop(ivd)
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# The user-facing wrapper.

def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type))


class _Static:
    """Hashable holder for the non-array leaves closed over when tracing."""
    __slots__ = ("vals", "_key")

    def __init__(self, vals):
        self.vals = vals
        try:
            self._key = hash(tuple(vals))
        except TypeError:
            self._key = None


def _split_args(args, kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_arr = tuple(_is_array(l) for l in leaves)
    arrays = [l for l, a in zip(leaves, is_arr) if a]
    static = [None if a else l for l, a in zip(leaves, is_arr)]
    return arrays, static, is_arr, treedef


def _merge_args(arrays, static, is_arr, treedef):
    it = iter(arrays)
    leaves = [next(it) if a else s for a, s in zip(is_arr, static)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _trace_and_eval(fn, arrays, static, is_arr, treedef, *, strict, backend, explain=None,
                    fuse=True):
    out_tree = []

    def flat_fn(*arrs):
        a, kw = _merge_args(arrs, static, is_arr, treedef)
        out = fn(*a, **kw)
        leaves, tree = jax.tree_util.tree_flatten(out)
        out_tree.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat_fn)(*arrays)
    interp = _Interpreter(strict, backend, explain, fuse)
    outs = interp.eval_jaxpr(closed.jaxpr, closed.consts, *arrays)
    return outs, out_tree[-1]


def _run(fn, args, kwargs, *, strict, backend, explain=None, fuse=True):
    arrays, static, is_arr, treedef = _split_args(args, kwargs)
    outs, tree = _trace_and_eval(fn, arrays, static, is_arr, treedef, strict=strict,
                                 backend=backend, explain=explain, fuse=fuse)
    return jax.tree_util.tree_unflatten(tree, outs)


class _Deterministic:
    """The callable returned by ``deterministic(fn)``: same signature as ``fn``."""

    def __init__(self, fn, strict, backend, fuse=True):
        self.fn = fn
        self.strict = strict
        self.backend = backend
        self.fuse = fuse
        self._cache: dict = {}
        try:
            functools.update_wrapper(self, fn, updated=())
        except AttributeError:  # pragma: no cover - callables without __name__ etc.
            pass

    def __call__(self, *args, **kwargs):
        # Like jax.jit: the function is traced once per argument structure / static values and the
        # interpreted jaxpr is compiled as one XLA computation (also when called eagerly).
        arrays, static, is_arr, treedef = _split_args(args, kwargs)
        key = (treedef, is_arr, tuple(static))
        try:
            hash(key)
        except TypeError:  # unhashable static leaf: trace every call
            return _run(self.fn, args, kwargs, strict=self.strict, backend=self.backend,
                        fuse=self.fuse)
        entry = self._cache.get(key)
        if entry is None:
            box: list = []

            def run_arrays(*arrs):
                outs, tree = _trace_and_eval(self.fn, arrs, static, is_arr, treedef,
                                             strict=self.strict, backend=self.backend,
                                             fuse=self.fuse)
                box[:] = [tree]
                return outs
            entry = self._cache[key] = (jax.jit(run_arrays), box)
        jitted, box = entry
        outs = jitted(*arrays)
        return jax.tree_util.tree_unflatten(box[0], outs)

    def explain(self, *args, **kwargs) -> Explanation:
        """Trace (abstractly, nothing runs) and report replaced / left / unsupported primitives."""
        rep = Explanation()

        def f(*a, **k):
            return _run(self.fn, a, k, strict=False, backend=self.backend, explain=rep,
                        fuse=self.fuse)

        arrays, static, is_arr, treedef = _split_args(args, kwargs)

        def g(*arrs):
            a, k = _merge_args(arrs, static, is_arr, treedef)
            return f(*a, **k)
        jax.eval_shape(g, *arrays)
        return rep

    def __get__(self, obj, objtype=None):  # usable as a method decorator
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)


class DeterministicModule:
    """A Flax NNX module called deterministically. ``.module`` is the wrapped module; calls write
    state mutations (RNG counters, batch stats, caches) back into it with ``nnx.update``."""

    def __init__(self, module, strict=True, backend=None, method="__call__", fuse=True):
        self.module = module
        self.strict = strict
        self.backend = backend
        self.fuse = fuse
        self.method = method
        self._det = None

    def _pure(self, graphdef, state, *args, **kwargs):
        from flax import nnx
        m = nnx.merge(graphdef, state)
        out = getattr(m, self.method)(*args, **kwargs)
        return out, nnx.state(m, nnx.Not(nnx.Param))  # params are not mutated by a call

    def __call__(self, *args, **kwargs):
        from flax import nnx
        graphdef, state = nnx.split(self.module)
        if self._det is None:
            self._det = _Deterministic(self._pure, self.strict, self.backend, self.fuse)
        out, new_state = self._det(graphdef, state, *args, **kwargs)
        if jax.tree_util.tree_leaves(new_state):
            nnx.update(self.module, new_state)
        return out

    def explain(self, *args, **kwargs) -> Explanation:
        from flax import nnx
        graphdef, state = nnx.split(self.module)
        return _Deterministic(self._pure, self.strict, self.backend, self.fuse).explain(
            graphdef, state, *args, **kwargs)


def _is_nnx_module(obj) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, nnx.Module)


def deterministic(fn: Callable | Any = None, *, strict: bool = True, backend=None,
                  fuse: bool = True):
    """Return ``fn`` with every order-dependent primitive replaced by a fixed-order detjax kernel.

    Args:
      fn: any function of arrays / pytrees (non-array leaves are treated as static), a linen
        ``model.apply``, or an ``nnx.Module`` (then a ``DeterministicModule`` is returned).
      strict: raise ``NondeterministicOpError`` on a primitive with no fixed-order implementation
        (default); ``False`` warns once per primitive and runs it on XLA.
      backend: detjax backend override for the replaced ops.
      fuse: run recognised patterns (attention, RMSNorm: ``detjax/_fusion.py``) as one fused
        detjax kernel each (default); ``False`` replaces primitive by primitive only.

    The result has ``.explain(*args)`` returning an ``Explanation``. Usable as a decorator
    (``@deterministic`` or ``@deterministic(strict=False)``).
    """
    if fn is None:
        return functools.partial(deterministic, strict=strict, backend=backend, fuse=fuse)
    if not isinstance(fuse, (bool, np.bool_)):
        raise TypeError(f"deterministic: fuse must be a bool; got {fuse!r}")
    if _is_nnx_module(fn):
        return DeterministicModule(fn, strict=strict, backend=backend, fuse=bool(fuse))
    if not callable(fn):
        raise TypeError(f"deterministic expects a callable or an nnx.Module; got {type(fn).__name__}")
    return _Deterministic(fn, strict, backend, bool(fuse))


def wrap(model_or_apply_fn, **kw):
    """User-facing wrapper: ``wrap(nnx_module)`` -> ``DeterministicModule`` (callable, with
    ``.module`` and ``.explain``); ``wrap(linen_model.apply)`` or any function -> the deterministic
    callable. Keyword arguments (``strict``, ``backend``, ``fuse``) go to ``deterministic``."""
    return deterministic(model_or_apply_fn, **kw)
