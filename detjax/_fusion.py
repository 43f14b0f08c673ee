"""Patterns ``detjax.deterministic`` runs as one fused detjax kernel instead of op by op.

The transform replaces order-dependent primitives one at a time. Some groups of primitives are one
well-known computation that detjax has a fused kernel for; running them op by op costs passes
through memory (the ``[B, heads, T, S]`` logits of an attention are written and read half a dozen
times). These patterns are recognised, in a jaxpr flattened through ``jit`` calls (also:
projections of one activation by several weights in one launch, ``_match_projections``, and
transcendental ops isolated with their elementwise neighbours, ``find_clusters``):

* **Attention**: ``dot_general(q, k)`` -> (transposes, converts, multiplications/divisions by a
  constant, an optional soft cap ``c * tanh(x / c)``) -> an optional mask ``where(mask, x, fill)``
  -> softmax over the key axis (max, subtract, ``exp``, sum, divide; with or without the usual
  guards) -> ``dot_general(p, v)``. It runs the attention kernel of ``pallas_kernels/attention.py``
  (its fixed reduction order; rows are the query positions times the query heads of one KV head).
  The mask must be provably an interval of keys per query row: a conjunction of comparisons of
  the key index (``iota``, shifted by key-invariant values) with key-invariant values, e.g. causal,
  sliding window (also ``|q - k| < w``), valid lengths. Any other mask, an additive bias, or an
  intermediate used outside the pattern leaves the primitives to the op-by-op path.
* **RMSNorm**: ``x * rsqrt(mean(x * x, -1) + eps) (* w)`` (optionally around casts) runs the
  ``rms_norm`` row kernel.

What the fused kernels do differently from the primitives they replace (all documented choices):

* The attention kernel keeps its own precision policy: for bf16/f16 ``q``, ``k``, ``v`` the
  probabilities are rounded to ``v``'s dtype before ``p @ v`` (as every flash attention does),
  even where the traced code upcast ``v`` to float32 for that product; the output is produced in
  the inputs' dtype and then cast to the dtype the traced ``dot_general`` produced. The error
  stays within the bf16/f16 tolerance of the tests.
* Rows whose mask is empty get what the traced code gives them: 0 (guarded softmax), NaN
  (unguarded, ``-inf`` fill) or the mean of ``v`` over all keys (finite fill, as ``nnx``'s
  ``finfo.min``), detected from the pattern's structure. A finite fill is accepted only when it is
  the logits dtype's most negative value or <= -1e9: then a masked key's ``exp(fill - max)`` is
  exactly 0 in any row with a valid key whose logit is above ``fill + 104``, and the kernel's
  exclusion of masked keys gives the traced result. (A smaller fill, e.g. -100, is not fused.)

``deterministic(fn, fuse=False)`` turns the patterns off.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core

__all__ = ["flatten", "find_fusions", "Fusion"]

_INLINE_CALLS = ("jit", "pjit", "closed_call", "core_call")


class _NoMatch(Exception):
    pass


def _need(cond):
    if not cond:
        raise _NoMatch


# ---------------------------------------------------------------------------------------------
# Flattening: inline calls whose bodies the interpreter would evaluate in place anyway.

def flatten(jaxpr, inline_custom: Callable, source: Callable, callsite: dict) -> _core.Jaxpr:
    """``jaxpr`` with every ``jit``/``closed_call`` (and every custom-derivative call for which
    ``inline_custom(eqn)`` is true) replaced by its body, with fresh variables. Calls whose body
    carries constants are kept. ``callsite[id(eqn)]`` is set, for every inlined eqn, to the user's
    source line of the call it came from (``source(eqn)``; library code has no user frame)."""
    if not any(_inlinable(e, inline_custom) for e in jaxpr.eqns):
        return jaxpr
    eqns: list = []

    def inline(j, in_atoms, top, site=None):
        sub = dict(zip(j.invars, in_atoms))

        def m(a):
            return a if isinstance(a, _core.Literal) else sub.get(a, a)

        for e in j.eqns:
            ins = [m(a) for a in e.invars]
            if _inlinable(e, inline_custom):
                body = _body(e)
                here = source(e)
                if here == "<no user frame>" and site is not None:
                    here = site
                outs = inline(body.jaxpr, ins, False, here)
                for ov, o in zip(e.outvars, outs):
                    if not isinstance(ov, _core.DropVar):
                        sub[ov] = o
                continue
            if top:
                outs = list(e.outvars)
            else:
                outs = [v if isinstance(v, _core.DropVar) else _core.Var(v.aval) for v in e.outvars]
                for ov, nv in zip(e.outvars, outs):
                    sub[ov] = nv
            new = e.replace(invars=ins, outvars=outs)
            if site is not None:
                callsite[id(new)] = site
            eqns.append(new)
        return [m(a) for a in j.outvars]

    outvars = inline(jaxpr, list(jaxpr.invars), True)
    return jaxpr.replace(eqns=eqns, outvars=outvars)


def _body(e):
    p = e.params
    return p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))


def _inlinable(e, inline_custom) -> bool:
    name = e.primitive.name
    if name in _INLINE_CALLS:
        pass
    elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        if not inline_custom(e):
            return False
    else:
        return False
    body = _body(e)
    return (body is not None and hasattr(body, "jaxpr") and hasattr(body, "consts")
            and not body.consts and not body.jaxpr.constvars)


# ---------------------------------------------------------------------------------------------
# The graph of a flat jaxpr.

class _Graph:
    def __init__(self, jaxpr, consts=()):
        self.eqns = jaxpr.eqns
        #: concrete values of the jaxpr's constants (closed-over arrays), where known
        self.const_vals = {v: c for v, c in zip(jaxpr.constvars, consts)
                           if not isinstance(c, jax.core.Tracer)}
        self.prod: dict = {}
        self.uses: dict = {}
        for i, e in enumerate(self.eqns):
            for v in e.outvars:
                if not isinstance(v, _core.DropVar):
                    self.prod[v] = i
            for a in e.invars:
                if not isinstance(a, _core.Literal):
                    self.uses.setdefault(a, []).append(i)
        for a in jaxpr.outvars:
            if not isinstance(a, _core.Literal):
                self.uses.setdefault(a, []).append(-1)  # used by the jaxpr's result

    def producer(self, atom, *names):
        """``(index, eqn)`` producing ``atom`` if its primitive is one of ``names`` (any if none)."""
        if isinstance(atom, _core.Literal) or atom not in self.prod:
            return None
        i = self.prod[atom]
        e = self.eqns[i]
        if names and e.primitive.name not in names:
            return None
        return i, e

    def scalar_const(self, atom, interior: set):
        """The Python value of a scalar literal, possibly broadcast or converted; its eqns are
        added to ``interior``."""
        found = []
        while not isinstance(atom, _core.Literal):
            pe = self.producer(atom, "broadcast_in_dim", "convert_element_type")
            if pe is None:
                return None
            found.append(pe[0])
            atom = pe[1].invars[0]
        if np.ndim(atom.val) != 0:
            return None
        interior.update(found)
        val = np.asarray(atom.val)
        return bool(val) if val.dtype == np.bool_ else float(val)


def _ndim(atom):
    return len(atom.aval.shape)


def _is_float_aval(atom):
    return jnp.issubdtype(atom.aval.dtype, jnp.floating)


# ---------------------------------------------------------------------------------------------
# Masks: proving that a boolean array is an interval of keys per row.
#
# An integer value along the key axis is classified as ("inv", get) (key-invariant: size 1 along
# the key axis; ``get(read)`` gives it), ("key", off) (key index + off) or ("abs", c) (|key - c|).
# A boolean as ("inv", get) or ("iv", lo, hi): keys [lo, hi). Getters return arrays of the
# value's rank (size 1 along the key axis) or scalars.

def _lit_or_read(atom):
    if isinstance(atom, _core.Literal):
        return lambda read: jnp.asarray(atom.val)
    return lambda read: read(atom)


def _int_value(g: _Graph, atom, ka, depth=0):
    _need(depth < 64)
    # signed integers only: bounds are computed as c - offset (unsigned values could wrap)
    _need(jnp.issubdtype(atom.aval.dtype, jnp.signedinteger))
    if isinstance(atom, _core.Literal) or not atom.aval.shape or atom.aval.shape[ka] == 1:
        return ("inv", _lit_or_read(atom))
    if atom in g.const_vals:  # a closed-over array: key index + offset if its values say so
        return _const_key(g.const_vals[atom], ka)
    pe = g.producer(atom)
    _need(pe is not None)
    _, e = pe
    name = e.primitive.name
    if name == "iota":
        if e.params["dimension"] != ka:  # an index along another axis: key-invariant
            shape = list(e.params["shape"])
            shape[ka] = 1
            dim, dt = e.params["dimension"], e.params["dtype"]
            return ("inv", lambda read: lax.broadcasted_iota(dt, tuple(shape), dim))
        return ("key", lambda read: 0)
    if name == "broadcast_in_dim":
        dims = tuple(e.params["broadcast_dimensions"])
        op = e.invars[0]
        if ka not in dims:  # broadcast along the key axis: key-invariant
            return ("inv", _expand(lambda read, op=op: read(op), dims, _ndim(atom)))
        kind = _int_value(g, op, dims.index(ka), depth + 1)
        return _lift(kind, dims, _ndim(atom))
    if name == "transpose":
        perm = tuple(e.params["permutation"])
        kind = _int_value(g, e.invars[0], perm[ka], depth + 1)
        return _permute(kind, perm)
    if name == "convert_element_type":
        _need(jnp.issubdtype(e.invars[0].aval.dtype, jnp.signedinteger))
        return _int_value(g, e.invars[0], ka, depth + 1)
    if name in ("add", "sub"):
        a = _int_value(g, e.invars[0], ka, depth + 1)
        b = _int_value(g, e.invars[1], ka, depth + 1)
        if a[0] == "inv" and b[0] == "inv":
            op = jnp.add if name == "add" else jnp.subtract
            return ("inv", lambda r, x=a[1], y=b[1]: op(x(r), y(r)))
        if a[0] == "key" and b[0] == "inv":
            off = (lambda r, x=a[1], y=b[1]: x(r) + y(r)) if name == "add" else \
                  (lambda r, x=a[1], y=b[1]: x(r) - y(r))
            return ("key", off)
        if a[0] == "inv" and b[0] == "key" and name == "add":
            return ("key", lambda r, x=a[1], y=b[1]: x(r) + y(r))
        if a[0] == "inv" and b[0] == "key" and name == "sub":
            return ("negkey", lambda r, x=a[1], y=b[1]: x(r) - y(r))  # c - key
        raise _NoMatch
    if name == "abs":
        a = _int_value(g, e.invars[0], ka, depth + 1)
        if a[0] == "key":     # |key + off| = |key - (-off)|
            return ("abs", lambda r, x=a[1]: -x(r))
        if a[0] == "negkey":  # |c - key| = |key - c|
            return ("abs", a[1])
        raise _NoMatch
    if name == "neg":
        a = _int_value(g, e.invars[0], ka, depth + 1)
        if a[0] == "key":
            return ("negkey", lambda r, x=a[1]: -x(r))
        raise _NoMatch
    raise _NoMatch


def _const_key(value, ka):
    """A concrete integer array that is ``arange`` along axis ``ka`` plus a key-invariant offset."""
    val = np.asarray(value)
    _need(np.issubdtype(val.dtype, np.signedinteger))
    off = np.take(val, [0], axis=ka)
    shape = [1] * val.ndim
    shape[ka] = val.shape[ka]
    _need(np.array_equal(val, off + np.arange(val.shape[ka]).reshape(shape)))
    return ("key", lambda read, off=off: jnp.asarray(off))


def _expand(get, dims, ndim):
    """A getter of an operand of ``broadcast_in_dim`` -> a getter with the output's rank (size 1
    where the broadcast adds axes)."""
    def f(read):
        x = jnp.asarray(get(read))
        if x.ndim == 0:
            return x
        shape = [1] * ndim
        for i, d in enumerate(dims):
            shape[d] = x.shape[i]
        return x.reshape(shape)
    return f


def _lift(kind, dims, ndim):
    return (kind[0],) + tuple(_expand(getter, dims, ndim) if callable(getter) else getter
                              for getter in kind[1:])


def _permute(kind, perm):
    def wrap(get):
        def f(read):
            x = jnp.asarray(get(read))
            return x if x.ndim == 0 else jnp.transpose(x, perm)
        return f
    return (kind[0],) + tuple(wrap(getter) for getter in kind[1:])


def _bool_value(g: _Graph, atom, ka, size, depth=0):
    """Classify a boolean mask along key axis ``ka`` of length ``size``."""
    _need(depth < 64)
    _need(atom.aval.dtype == jnp.bool_)
    if isinstance(atom, _core.Literal):
        return ("inv", _lit_or_read(atom))
    if not atom.aval.shape or atom.aval.shape[ka] == 1:
        return ("inv", _lit_or_read(atom))
    pe = g.producer(atom)
    _need(pe is not None)
    _, e = pe
    name = e.primitive.name
    if name == "broadcast_in_dim":
        dims = tuple(e.params["broadcast_dimensions"])
        op = e.invars[0]
        if ka not in dims:
            if isinstance(op, _core.Literal):
                return ("inv", lambda read, v=op.val: jnp.asarray(v))
            return ("inv", _expand(lambda read, op=op: read(op), dims, _ndim(atom)))
        return _lift(_bool_value(g, op, dims.index(ka), size, depth + 1), dims, _ndim(atom))
    if name == "transpose":
        perm = tuple(e.params["permutation"])
        return _permute(_bool_value(g, e.invars[0], perm[ka], size, depth + 1), perm)
    if name == "convert_element_type":
        # bool -> float -> bool round trips (masks stored as floats by flax)
        src = g.producer(e.invars[0], "convert_element_type")
        _need(src is not None and src[1].invars[0].aval.dtype == jnp.bool_)
        return _bool_value(g, src[1].invars[0], ka, size, depth + 1)
    if name == "select_n" and len(e.invars) == 3:
        # select_n(c, False, x) == c & x  (jnp.tril / triu build masks this way)
        pred, on_false, on_true = e.invars
        _need(g.scalar_const(on_false, set()) is False)
        c = _as_interval(_bool_value(g, pred, ka, size, depth + 1), size)
        x = _as_interval(_bool_value(g, on_true, ka, size, depth + 1), size)
        return ("iv", lambda r: jnp.maximum(c[1](r), x[1](r)),
                lambda r: jnp.minimum(c[2](r), x[2](r)))
    if name == "and":
        a = _as_interval(_bool_value(g, e.invars[0], ka, size, depth + 1), size)
        b = _as_interval(_bool_value(g, e.invars[1], ka, size, depth + 1), size)
        return ("iv", lambda r: jnp.maximum(a[1](r), b[1](r)),
                lambda r: jnp.minimum(a[2](r), b[2](r)))
    if name in ("lt", "le", "gt", "ge"):
        x = _int_value(g, e.invars[0], ka, depth + 1)
        y = _int_value(g, e.invars[1], ka, depth + 1)
        if x[0] == "inv" and y[0] != "inv":  # c < key  ==  key > c
            x, y = y, x
            name = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}[name]
        _need(y[0] == "inv")
        c = y[1]
        if x[0] == "key":                    # key + off  OP  c
            off = x[1]
            bound = lambda r: c(r) - off(r)  # noqa: E731
            if name == "lt":
                return ("iv", lambda r: 0, bound)
            if name == "le":
                return ("iv", lambda r: 0, lambda r: bound(r) + 1)
            if name == "gt":
                return ("iv", lambda r: bound(r) + 1, lambda r: size)
            return ("iv", bound, lambda r: size)
        if x[0] == "negkey":                 # cc - key  OP  c   ==  key  OP'  cc - c
            cc = x[1]
            bound = lambda r: cc(r) - c(r)  # noqa: E731
            if name == "lt":                 # key > bound
                return ("iv", lambda r: bound(r) + 1, lambda r: size)
            if name == "le":
                return ("iv", bound, lambda r: size)
            if name == "gt":
                return ("iv", lambda r: 0, bound)
            return ("iv", lambda r: 0, lambda r: bound(r) + 1)
        if x[0] == "abs" and name in ("lt", "le"):  # |key - cc| < c
            cc = x[1]
            w = c if name == "lt" else (lambda r: c(r) + 1)
            return ("iv", lambda r: cc(r) - w(r) + 1, lambda r: cc(r) + w(r))
        raise _NoMatch
    raise _NoMatch


def _as_interval(kind, size):
    if kind[0] == "iv":
        return kind
    get = kind[1]
    return ("iv", lambda r: 0, lambda r: jnp.where(get(r), size, 0))


# ---------------------------------------------------------------------------------------------
# Fusions

@dataclasses.dataclass
class Fusion:
    """A recognised pattern: evaluate ``run(read, backend)`` at eqn ``anchor`` and skip the eqns in
    ``interior``. ``run`` returns the value of the anchor's output, or with ``outvars`` set, a list
    of values for those vars."""
    kind: str
    anchor: int
    interior: frozenset
    run: Callable
    note: str
    outvars: tuple = ()


def find_fusions(jaxpr, backend: str, consts=()) -> dict:
    """``{anchor index: Fusion}`` for the patterns in a flat ``jaxpr`` (non-overlapping);
    ``consts``: the values of its constvars."""
    if backend in ("tpu", "tpu-interpret"):
        return {}  # the TPU attention kernel takes positions, not intervals; not wired
    g = _Graph(jaxpr, consts)
    taken: set = set()
    found: dict = {}
    for f in _match_projections(g):
        taken |= f.interior
        found[f.anchor] = f
    for i, e in enumerate(g.eqns):
        name = e.primitive.name
        if i in taken:
            continue
        try:
            if name == "dot_general" and _is_float_aval(e.outvars[0]):
                f = _match_attention(g, i)
            elif name == "reduce_sum" and _is_float_aval(e.outvars[0]):
                f = _match_rms_norm(g, i)
            else:
                continue
        except _NoMatch:
            continue
        if f.interior & taken:
            continue
        if not _closed(g, f.interior, f.anchor):
            continue
        taken |= f.interior
        found[f.anchor] = f
    return found


def _closed(g: _Graph, interior, anchor) -> bool:
    """Every value made inside the pattern (but the anchor's) is used only inside it."""
    for i in interior:
        if i == anchor:
            continue
        for v in g.eqns[i].outvars:
            if isinstance(v, _core.DropVar):
                continue
            if any(u not in interior for u in g.uses.get(v, ())):
                return False
    return True


# -- attention ---------------------------------------------------------------------------------

def _walk_stat(g: _Graph, atom, prim, operand, interior):
    """From a softmax statistic's use back to ``prim`` (reduce_max/reduce_sum) of ``operand`` over
    its last axis, through keepdims reshapes, transposes and the usual guards. The reduction may
    also be of the array ``operand`` is a transpose of (``jax.nn.dot_product_attention`` takes the
    max before moving the heads), if the transposes of the statistic are that transpose's.
    Returns the guards seen."""
    guards = set()
    perms = []  # transposes of the statistic, last first
    rank = _ndim(operand)
    for _ in range(24):
        pe = g.producer(atom)
        _need(pe is not None)
        i, e = pe
        name = e.primitive.name
        interior.add(i)
        if name == prim:
            _need(tuple(e.params["axes"]) == (_ndim(e.invars[0]) - 1,))
            if e.invars[0] is operand:
                _need(not perms)
                return guards
            tp = g.producer(operand, "transpose")
            _need(tp is not None and tp[1].invars[0] is e.invars[0])
            perm = tuple(tp[1].params["permutation"])
            _need(perm[-1] == rank - 1)
            axes = list(range(rank - 1))
            for p in reversed(perms):
                axes = [axes[j] for j in p]
            _need(tuple(axes) == perm[:-1])
            return guards
        if name == "transpose":
            perm = tuple(e.params["permutation"])
            if len(perm) == rank:                    # after keepdims: the unit axis stays last
                _need(perm[-1] == rank - 1)
                perm = perm[:-1]
            _need(len(perm) == rank - 1)
            perms.append(perm)
            atom = e.invars[0]
            continue
        if name == "broadcast_in_dim":
            op = e.invars[0]
            nd = _ndim(op)
            _need(tuple(e.params["broadcast_dimensions"]) == tuple(range(nd))
                  and all(d == 1 for d in e.outvars[0].aval.shape[nd:]))
            atom = op
            continue
        if name == "reshape":
            a_shape = tuple(d for d in e.invars[0].aval.shape)
            o_shape = tuple(d for d in e.outvars[0].aval.shape)
            strip = lambda sh: sh[:len(sh) - next((k for k, d in enumerate(reversed(sh)) if d != 1), 0)]  # noqa: E731
            _need(strip(a_shape) == strip(o_shape))
            atom = e.invars[0]
            continue
        if name == "stop_gradient":
            atom = e.invars[0]
            continue
        if name == "max":  # max(-inf, m): a no-op guard
            lit = [a for a in e.invars if g.scalar_const(a, interior) == -math.inf]
            _need(len(lit) == 1)
            atom = e.invars[1] if lit[0] is e.invars[0] else e.invars[0]
            continue
        if name == "select_n" and len(e.invars) == 3:
            pred, on_false, on_true = e.invars
            fill = g.scalar_const(on_false, interior)
            pp = g.producer(pred)
            _need(fill is not None and pp is not None)
            pname = pp[1].primitive.name
            if pname == "is_finite" and pp[1].invars[0] is on_true and fill == 0.0:
                guards.add("finite_max")
            elif (pname == "gt" and pp[1].invars[0] is on_true
                  and g.scalar_const(pp[1].invars[1], interior) == 0.0 and fill == 1.0):
                guards.add("positive_sum")
            else:
                raise _NoMatch
            interior.add(pp[0])
            atom = on_true
            continue
        raise _NoMatch
    raise _NoMatch


def _mask_root(g: _Graph, atom):
    """A mask as (source, the broadcasts applied to it): two masks with equal keys are equal
    (each inlined ``where`` broadcasts its own copy of the same mask)."""
    steps = []
    while (pe := g.producer(atom, "broadcast_in_dim")) is not None:
        steps.append((tuple(pe[1].params["broadcast_dimensions"]), tuple(atom.aval.shape)))
        atom = pe[1].invars[0]
    return atom, tuple(steps)


def _match_attention(g: _Graph, i2: int) -> Fusion:
    e2 = g.eqns[i2]
    for p_side in (0, 1):
        try:
            return _match_attention_side(g, i2, e2, p_side)
        except _NoMatch:
            pass
    raise _NoMatch


def _match_attention_side(g, i2, e2, p_side) -> Fusion:
    interior = {i2}
    (lc, rc), (lb, rb) = e2.params["dimension_numbers"]
    cp, cv = (lc, rc) if p_side == 0 else (rc, lc)
    bp, bv = (lb, rb) if p_side == 0 else (rb, lb)
    p_atom, v_atom = e2.invars[p_side], e2.invars[1 - p_side]
    _need(len(cp) == 1 and len(cv) == 1)
    # p = e / sum(e) (through casts)
    while (pe := g.producer(p_atom, "convert_element_type")) is not None:
        _need(_is_float_aval(pe[1].invars[0]))
        interior.add(pe[0])
        p_atom = pe[1].invars[0]
    pe = g.producer(p_atom, "div")
    _need(pe is not None)
    interior.add(pe[0])
    e_atom, den = pe[1].invars
    rank = _ndim(e_atom)
    _need(tuple(cp) == (rank - 1,) and _is_float_aval(e_atom))
    guards = _walk_stat(g, den, "reduce_sum", e_atom, interior)
    # e = [where(mask, ] exp(lm - max(lm)) [, 0)]
    masked_exp = None
    pe = g.producer(e_atom, "select_n")
    if pe is not None:
        pred, on_false, on_true = pe[1].invars
        _need(g.scalar_const(on_false, interior) == 0.0)
        interior.add(pe[0])
        masked_exp = _mask_root(g, pred)
        e_atom = on_true
    pe = g.producer(e_atom, "exp")
    _need(pe is not None)
    interior.add(pe[0])
    pe = g.producer(pe[1].invars[0], "sub")
    _need(pe is not None)
    interior.add(pe[0])
    lm, mx = pe[1].invars
    guards |= _walk_stat(g, mx, "reduce_max", lm, interior)
    # lm = [where(mask, ] logits [, fill)]
    mask, fill = None, None
    pe = g.producer(lm, "select_n")
    if pe is not None:
        pred, on_false, on_true = pe[1].invars
        fill = g.scalar_const(on_false, interior)
        # a finite fill must be far below any logit, so exp(fill - max) is exactly 0 in a row with
        # a valid key: the dtype's most negative value (nnx, jax.nn) or <= -1e9 (ported code)
        lowest = float(jnp.finfo(lm.aval.dtype).min) if _is_float_aval(lm) else -math.inf
        _need(fill is not None and (fill == -math.inf or fill == lowest
                                    or (math.isfinite(fill) and fill <= -1e9)))
        interior.add(pe[0])
        mask = pred
        logits = on_true
    else:
        logits = lm
    if masked_exp is not None:
        _need(mask is not None and _mask_root(g, mask) == masked_exp)
    sel_shape = tuple(lm.aval.shape)
    size = sel_shape[-1]
    # logits <- dot_general(q, k): transposes, casts, constant scales, a soft cap
    chain = []  # eqns from the logits back to D1 (excluding D1)
    scale, cap, seen_scale = 1.0, None, False
    atom = logits
    while True:
        pe = g.producer(atom)
        _need(pe is not None)
        i, e = pe
        name = e.primitive.name
        if name == "dot_general":
            i1, e1 = i, e
            interior.add(i1)
            break
        interior.add(i)
        if name == "transpose":
            chain.append(e)
            atom = e.invars[0]
        elif name == "convert_element_type":
            _need(_is_float_aval(e.invars[0]))
            atom = e.invars[0]
        elif name == "mul":
            a, b = e.invars
            ca, cb = g.scalar_const(a, interior), g.scalar_const(b, interior)
            c, x = (ca, b) if ca is not None else (cb, a)
            _need(c is not None)
            tp = g.producer(x, "tanh")
            if tp is not None and not seen_scale and cap is None:
                dp = g.producer(tp[1].invars[0], "div")
                _need(dp is not None and g.scalar_const(dp[1].invars[1], interior) == c and c > 0)
                interior.update((tp[0], dp[0]))
                cap = c
                atom = dp[1].invars[0]
            else:
                scale *= c
                seen_scale = True
                atom = x
        elif name == "div":
            c = g.scalar_const(e.invars[1], interior)
            _need(c is not None and c != 0)
            scale /= c
            seen_scale = True
            atom = e.invars[0]
        else:
            raise _NoMatch
    _need(math.isfinite(scale))
    # axes of the logits at the select, as D1-output axes
    nd1 = _ndim(e1.outvars[0])
    axes = list(range(nd1))
    for e in reversed(chain):
        perm = e.params["permutation"]
        axes = [axes[p] for p in perm]
    _need(len(axes) == rank)
    (l1c, r1c), (l1b, r1b) = e1.params["dimension_numbers"]
    _need(len(l1c) == 1 and len(r1c) == 1)
    nb = len(l1b)
    a_op, b_op = e1.invars
    a_free = [d for d in range(_ndim(a_op)) if d not in l1c and d not in l1b]
    b_free = [d for d in range(_ndim(b_op)) if d not in r1c and d not in r1b]
    s_log = axes[-1]
    a_ids = list(range(nb, nb + len(a_free)))
    b_ids = list(range(nb + len(a_free), nb + len(a_free) + len(b_free)))
    if s_log in b_ids:                     # the key axis is the rhs's free axis
        q_op, k_op, qc, kc, qb, kb, q_free, k_free, q_ids = (
            a_op, b_op, l1c, r1c, l1b, r1b, a_free, b_free, a_ids)
    else:
        _need(s_log in a_ids)
        q_op, k_op, qc, kc, qb, kb, q_free, k_free, q_ids = (
            b_op, a_op, r1c, l1c, r1b, l1b, b_free, a_free, b_ids)
    _need(len(k_free) == 1 and size > 0)
    # p @ v
    p_ids = axes  # the chain from the select to p is elementwise
    _need(sorted(p_ids[a] for a in bp) == list(range(nb)))
    v_free = [d for d in range(_ndim(v_atom)) if d not in cv and d not in bv]
    _need(len(v_free) == 1)
    h = q_op.aval.shape[qc[0]]
    _need(v_atom.aval.shape[v_free[0]] == h and v_atom.aval.shape[cv[0]] == size)
    v_src = v_atom
    while (pe := g.producer(v_src, "convert_element_type")) is not None and \
            _is_float_aval(pe[1].invars[0]):
        v_src = pe[1].invars[0]
    dtypes = {jnp.dtype(x.aval.dtype) for x in (q_op, k_op, v_src)}
    dt = jnp.result_type(*dtypes)
    _need(dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)))
    # layouts (lists of logical ids; "S" the key axis, "H" the head dim)
    q_lay = [None] * _ndim(q_op)
    for j, d in enumerate(qb):
        q_lay[d] = j
    for j, d in enumerate(q_free):
        q_lay[d] = q_ids[j]
    q_lay[qc[0]] = "H"
    k_lay = [None] * _ndim(k_op)
    for j, d in enumerate(kb):
        k_lay[d] = j
    k_lay[k_free[0]] = "S"
    k_lay[kc[0]] = "H"
    v_lay = [None] * _ndim(v_atom)
    for d_p, d_v in zip(bp, bv):
        v_lay[d_v] = p_ids[d_p]
    v_lay[cv[0]] = "S"
    v_lay[v_free[0]] = "H"
    p_free = [d for d in range(rank) if d != rank - 1 and d not in bp]
    out_batch = [p_ids[d] for d in bp]
    _need(sorted(p_ids[d] for d in p_free) == sorted(q_ids))
    out_lay = out_batch + ([p_ids[d] for d in p_free] + ["H"] if p_side == 0
                           else ["H"] + [p_ids[d] for d in p_free])
    sel_ids = axes[:-1]  # logical ids of the select's non-key axes
    mask_kind = None
    if mask is not None:
        mask_kind = _as_interval(_bool_value(g, mask, rank - 1, size), size)
    if masked_exp is not None or (fill == -math.inf and "finite_max" in guards):
        empty = "zero" if "positive_sum" in guards else "nan"
    elif fill is not None and fill != -math.inf:
        empty = "mean"
    else:
        empty = "nan"
    out_dtype = e2.outvars[0].aval.dtype
    spec = _AttnSpec(q_op, k_op, v_src, q_lay, k_lay, v_lay, out_lay, sel_ids, sel_shape,
                     mask_kind, size, nb, q_ids, scale, cap, empty, dt, out_dtype)
    note = (f"attention: q {_shape(q_op)}, k {_shape(k_op)}, v {_shape(v_src)}, scale {scale:g}"
            + (f", soft cap {cap:g}" if cap is not None else "")
            + (", interval mask" if mask is not None else "") + f", empty rows -> {empty}")
    anchor = max(interior)
    return Fusion("attention", anchor, frozenset(interior), spec.run, note)


def _shape(atom):
    return f"{jnp.dtype(atom.aval.dtype).name}{list(atom.aval.shape)}"


@dataclasses.dataclass
class _AttnSpec:
    q: object
    k: object
    v: object
    q_lay: list
    k_lay: list
    v_lay: list
    out_lay: list
    sel_ids: list
    sel_shape: tuple
    mask: object
    size: int
    nb: int
    q_ids: list
    scale: float
    cap: float | None
    empty: str
    dtype: object
    out_dtype: object

    def run(self, read, backend):
        from detjax.ops import _attention as _a
        from pallas_kernels import attention as _k

        q, k, v = (read(a).astype(self.dtype) for a in (self.q, self.k, self.v))
        batch = list(range(self.nb))
        # kernel batch axes X (before the key axis in k's layout) and head axes Y (after it)
        if self.k_lay[-1] == "H":
            s_at = self.k_lay.index("S")
            xs, ys = self.k_lay[:s_at], self.k_lay[s_at + 1:-1]
        else:
            xs, ys = [d for d in self.k_lay if d in batch], []
        sizes = {}
        for lay, x in ((self.q_lay, q), (self.k_lay, k)):
            for d, n in zip(lay, x.shape):
                sizes[d] = n
        lo, hi = self._bounds(read)                       # [sel non-key axes] (size 1 broadcast)
        lo_ids = list(self.sel_ids)
        if ys and any(lo.shape[lo_ids.index(y)] != 1 or hi.shape[lo_ids.index(y)] != 1
                      for y in ys):
            xs, ys = xs + ys, []                          # the mask varies per head: fold heads
        rows = self.q_ids
        rn = math.prod(sizes[d] for d in rows)
        xn = math.prod(sizes[d] for d in xs)
        yn = math.prod(sizes[d] for d in ys)
        h = sizes["H"]

        def to(x, lay, order, shape):
            return jnp.transpose(x, [lay.index(d) for d in order]).reshape(shape)

        q4 = to(q, self.q_lay, xs + rows + ys + ["H"], (xn, rn, yn, h))
        k4 = to(k, self.k_lay, xs + ["S"] + ys + ["H"], (xn, self.size, yn, h))
        v4 = to(v, self.v_lay, xs + ["S"] + ys + ["H"], (xn, self.size, yn, h))

        def rows_of(b):
            ids = list(lo_ids)
            if ys:
                b = b[tuple(0 if d in ys else slice(None) for d in ids)]
                ids = [d for d in ids if d not in ys]
            b = jnp.broadcast_to(b, tuple(sizes[d] for d in ids))
            return to(b, ids, xs + rows, (xn, rn))

        lo2, hi2 = rows_of(lo), rows_of(hi)
        lo2 = jnp.clip(lo2, 0, self.size)
        hi2 = jnp.clip(hi2, 0, self.size)
        is_empty = hi2 <= lo2
        lo2, hi2 = jnp.where(is_empty, 0, lo2), jnp.where(is_empty, 0, hi2)
        hp = _k.padded_head_dim(h)
        qp = _k.pack_rows(q4, yn, hp)
        rp = qp.shape[2]
        lo_p, hi_p = (_k.pack_row_ints(a, 1, rp) for a in (lo2, hi2))
        kvl = jnp.full(lo_p.shape, self.size, jnp.int32)
        be = backend
        cfg = _k.AttnConfig(float(self.scale), None if self.cap is None else float(self.cap), be)
        o = _a._core(qp, _k.pad_kv(k4, hp), _k.pad_kv(v4, hp), lo_p, hi_p, kvl, cfg)
        o = _k.unpack_rows(o, rn, yn, h)                  # [X, R, Y, H]
        if self.empty != "zero":
            if self.empty == "nan":
                fix = jnp.full((), jnp.nan, o.dtype)
            else:
                from detjax.ops import _reductions
                fix = _reductions.mean(v4.astype(jnp.float32), axis=1,
                                       backend=be).astype(o.dtype)[:, None]  # [X, 1, Y, H]
            o = jnp.where(is_empty[:, :, None, None], fix, o)
        o = o.reshape(tuple(sizes[d] for d in xs + rows + ys) + (h,))
        cur = xs + rows + ys + ["H"]
        o = jnp.transpose(o, [cur.index(d) for d in self.out_lay])
        return o.astype(self.out_dtype)

    def _bounds(self, read):
        nd = len(self.sel_shape) - 1
        if self.mask is None:
            z = jnp.zeros((1,) * nd, jnp.int32)
            return z, z + self.size

        def get(fn):
            x = jnp.asarray(fn(read)).astype(jnp.int32)
            if x.ndim == 0:
                return x.reshape((1,) * nd)
            return x[..., 0]  # the key axis (size 1: the bounds are key-invariant)
        lo, hi = get(self.mask[1]), get(self.mask[2])
        shape = tuple(max(a, b) for a, b in zip(lo.shape, hi.shape))
        return jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)


# -- RMSNorm -----------------------------------------------------------------------------------

def _match_rms_norm(g: _Graph, i0: int) -> Fusion:
    e0 = g.eqns[i0]
    sq = e0.invars[0]
    rank = _ndim(sq)
    _need(rank >= 1 and tuple(e0.params["axes"]) == (rank - 1,))
    d = sq.aval.shape[-1]
    interior = {i0}
    pe = g.producer(sq)
    _need(pe is not None)
    name = pe[1].primitive.name
    if name == "mul":
        _need(pe[1].invars[0] is pe[1].invars[1])
    elif name == "integer_pow":
        _need(pe[1].params["y"] == 2)
    else:
        _need(name == "square")
    interior.add(pe[0])
    xf = pe[1].invars[0]
    _need(jnp.dtype(xf.aval.dtype) == jnp.float32 and d > 0)
    # forward: sum -> (keepdims) -> / d -> + eps -> rsqrt -> (broadcast) -> xf * r -> (* w) -> cast
    atom = e0.outvars[0]
    seen_mean, eps = False, None
    while True:
        us = g.uses.get(atom, [])
        _need(len(us) == 1 and us[0] >= 0)
        i = us[0]
        e = g.eqns[i]
        name = e.primitive.name
        interior.add(i)
        if name in ("broadcast_in_dim", "reshape"):
            _need(e.outvars[0].aval.shape[:rank - 1] == sq.aval.shape[:rank - 1])
            atom = e.outvars[0]
        elif name == "div" and not seen_mean and e.invars[0] is atom:
            _need(g.scalar_const(e.invars[1], interior) == float(d))
            seen_mean = True
            atom = e.outvars[0]
        elif name == "mul" and not seen_mean:
            other = e.invars[1] if e.invars[0] is atom else e.invars[0]
            c = g.scalar_const(other, interior)
            _need(c is not None and abs(c * d - 1.0) < 1e-6)
            seen_mean = True
            atom = e.outvars[0]
        elif name == "add" and seen_mean and eps is None:
            other = e.invars[1] if e.invars[0] is atom else e.invars[0]
            eps = g.scalar_const(other, interior)
            _need(eps is not None and eps > 0)
            atom = e.outvars[0]
        elif name == "rsqrt" and eps is not None:
            atom = e.outvars[0]
            break
        else:
            raise _NoMatch
    # r (possibly broadcast) times xf
    while True:
        us = g.uses.get(atom, [])
        _need(len(us) == 1 and us[0] >= 0)
        i = us[0]
        e = g.eqns[i]
        interior.add(i)
        if e.primitive.name in ("broadcast_in_dim", "reshape"):
            atom = e.outvars[0]
            continue
        _need(e.primitive.name == "mul" and xf in e.invars)
        _need(tuple(e.outvars[0].aval.shape) == tuple(xf.aval.shape))
        atom = e.outvars[0]
        break
    weight = None
    us = g.uses.get(atom, [])
    if len(us) == 1 and us[0] >= 0 and g.eqns[us[0]].primitive.name == "mul":
        e = g.eqns[us[0]]
        other = e.invars[1] if e.invars[0] is atom else e.invars[0]
        w = _row_vector(g, other, d, rank)
        if w is not None and tuple(e.outvars[0].aval.shape) == tuple(xf.aval.shape):
            wi, weight = w
            interior.add(us[0])
            interior.update(wi)
            atom = e.outvars[0]
    out_cast = None
    us = g.uses.get(atom, [])
    if len(us) == 1 and us[0] >= 0 and g.eqns[us[0]].primitive.name == "convert_element_type":
        e = g.eqns[us[0]]
        if _is_float_aval(e.outvars[0]):
            out_cast = jnp.dtype(e.outvars[0].aval.dtype)
            interior.add(us[0])
            atom = e.outvars[0]
    residual = None
    us = g.uses.get(atom, [])
    if (out_cast is not None and out_cast.itemsize == 2 and len(us) == 1 and us[0] >= 0
            and g.eqns[us[0]].primitive.name == "add"):
        # residual + norm(x): one kernel, bitwise the same (a bf16/f16 sum is exact in float32)
        e = g.eqns[us[0]]
        other = e.invars[1] if e.invars[0] is atom else e.invars[0]
        if (not isinstance(other, _core.Literal) and other is not atom
                and tuple(other.aval.shape) == tuple(xf.aval.shape)
                and jnp.dtype(other.aval.dtype) == out_cast):
            residual = other
            interior.add(us[0])
    x_in = xf
    src = g.producer(xf, "convert_element_type")
    if src is not None and out_cast is not None and \
            jnp.dtype(src[1].invars[0].aval.dtype) == out_cast and out_cast.itemsize == 2:
        x_in = src[1].invars[0]  # bf16/f16 in and out: the kernel reads and writes them directly

    def run(read, backend):
        from detjax.ops import _reductions
        x = read(x_in)
        if weight is None:
            w, off = jnp.zeros((d,), jnp.float32), 1.0
        else:
            w, off = jnp.asarray(read(weight)), 0.0
            w = w.reshape(d)
            if not jnp.issubdtype(w.dtype, jnp.floating):
                w = w.astype(jnp.float32)
        if residual is not None and x.dtype == out_cast:
            return _reductions.rms_norm(x, w, eps=float(eps), offset=off, backend=backend,
                                        residual=read(residual))
        y = _reductions.rms_norm(x, w, eps=float(eps), offset=off, backend=backend)
        y = y if out_cast is None else y.astype(out_cast)
        return y if residual is None else read(residual) + y

    note = (f"rms_norm: x {_shape(x_in)}, eps {eps:g}" + (", weight" if weight is not None else "")
            + (f" -> {out_cast.name}" if out_cast is not None else "")
            + (" + residual" if residual is not None else ""))
    return Fusion("rms_norm", max(interior), frozenset(interior), run, note)


def _row_vector(g: _Graph, atom, d, rank):
    """A ``[d]`` vector broadcast along the last axis: ``(eqn indices, the vector)``."""
    found = []
    while True:
        if isinstance(atom, _core.Literal):
            return None
        shape = tuple(atom.aval.shape)
        if shape == (d,):
            return found, atom
        pe = g.producer(atom, "broadcast_in_dim", "reshape")
        if pe is None:
            return None
        e = pe[1]
        op = e.invars[0]
        if e.primitive.name == "broadcast_in_dim":
            dims = tuple(e.params["broadcast_dimensions"])
            if _ndim(op) == 0 or dims[-1] != len(shape) - 1 or op.aval.shape[-1] != d:
                return None
            if math.prod(op.aval.shape) != d:
                return None
        else:
            if math.prod(op.aval.shape) != d:
                return None
        found.append(pe[0])
        atom = op


# ---------------------------------------------------------------------------------------------
# Elementwise clusters: a transcendental op isolated together with its elementwise neighbours.
#
# The transform gives every transcendental op (``exp``, ``tanh``, ...) a fusion of its own
# (``transform._ISOLATED``: XLA:GPU's code for it changed with the fusion around it). Alone, each
# costs a write and a read of its input and output; a GeGLU's ``tanh`` then takes three passes over
# the hidden activations. A cluster isolates the connected elementwise code around it as one unit
# instead (as ``detjax.nn``'s ``geglu`` does): the fusion is still fixed by the traced code alone,
# never by its neighbours or the batch.

#: Elementwise primitives a cluster may hold (no CPU lane fixes: those keep their own handling).
_ELEMENTWISE = frozenset("""
add sub mul div neg max min abs sign convert_element_type integer_pow square select_n exp exp2
expm1 log log1p tanh logistic erf erfc sin cos pow is_finite eq ne lt le gt ge and or not clamp
floor ceil round copy
""".split())


@dataclasses.dataclass
class Cluster:
    """Eqns ``members`` (ascending) evaluated as one isolated function at ``anchor``, from
    ``inputs`` (atoms made outside) to its one ``output`` var."""
    anchor: int
    members: tuple
    inputs: tuple
    output: object
    seeds: tuple

    def run(self, read, eqns, isolate):
        members = [eqns[i] for i in self.members]

        def fn(*vals):
            env = dict(zip(self.inputs, vals))
            rd = lambda a: a.val if isinstance(a, _core.Literal) else env[a]  # noqa: E731
            for e in members:
                params = e.primitive.get_bind_params(e.params)
                out = e.primitive.bind(*[rd(a) for a in e.invars], **params)
                env[e.outvars[0]] = out
            return env[self.output]
        return isolate(fn, *[read(a) for a in self.inputs])


def find_clusters(jaxpr, is_seed: Callable, taken) -> dict:
    """``{anchor: Cluster}``: the elementwise neighbourhood (same shape) of each seed eqn, where it
    can be evaluated as one unit with one output; eqns in ``taken`` (fused patterns) are left out.
    A seed whose neighbourhood does not qualify is not in the result (isolated alone)."""
    g = _Graph(jaxpr)
    out: dict = {}
    used = set(taken)
    for s, seed in enumerate(g.eqns):
        if s in used or not is_seed(seed):
            continue
        shape = tuple(seed.outvars[0].aval.shape)

        def eligible(i):
            if i in used or i < 0:
                return False
            e = g.eqns[i]
            if e.primitive.name not in _ELEMENTWISE or len(e.outvars) != 1:
                return False
            if tuple(e.outvars[0].aval.shape) != shape:
                return False
            return all(isinstance(a, _core.Literal) or not a.aval.shape
                       or tuple(a.aval.shape) == shape for a in e.invars)

        members, todo = {s}, [s]
        while todo:
            i = todo.pop()
            e = g.eqns[i]
            nbrs = [g.prod[a] for a in e.invars if not isinstance(a, _core.Literal) and a in g.prod]
            nbrs += [u for v in e.outvars for u in g.uses.get(v, ())]
            for j in nbrs:
                if j not in members and eligible(j):
                    members.add(j)
                    todo.append(j)
        anchor = max(members)
        outs = [g.eqns[i].outvars[0] for i in members
                if any(u not in members for u in g.uses.get(g.eqns[i].outvars[0], ()))]
        if len(outs) != 1 or len(members) == 1:
            continue
        if any(u != -1 and u < anchor and u not in members for u in g.uses.get(outs[0], ())):
            continue
        inputs = []
        for i in sorted(members):
            for a in g.eqns[i].invars:
                if isinstance(a, _core.Literal) or a in inputs:
                    continue
                if g.prod.get(a) in members:
                    continue
                inputs.append(a)
        if any(a.aval.shape and tuple(a.aval.shape) != shape for a in inputs):
            continue
        seeds = tuple(i for i in sorted(members) if is_seed(g.eqns[i]))
        out[anchor] = Cluster(anchor, tuple(sorted(members)), tuple(inputs), outs[0], seeds)
        used |= members
    return out


# -- sibling projections -----------------------------------------------------------------------

def _projection_weight(e):
    """``(lhs, weight layout)`` if ``e`` is ``x[..., D] . W`` with ``W`` ``[D, N]`` or ``[G, D, H]``
    contracted on D, no batch dimensions."""
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    x, w = e.invars
    if lb or rb or len(lc) != 1 or len(rc) != 1 or isinstance(x, _core.Literal):
        return None
    if tuple(lc) != (_ndim(x) - 1,) or not _is_float_aval(e.outvars[0]):
        return None
    if _ndim(w) == 2 and tuple(rc) == (0,):
        return "dn"
    if _ndim(w) == 3 and tuple(rc) == (1,):
        return "gdh"
    return None


def _match_projections(g: _Graph):
    """Dot products of one activation with several weights (q/k/v, gate/up), each bitwise what it
    gives alone (``head_projections``), in one kernel launch on the GPU."""
    groups: dict = {}
    for i, e in enumerate(g.eqns):
        if e.primitive.name != "dot_general":
            continue
        lay = _projection_weight(e)
        if lay is None:
            continue
        key = (e.invars[0], jnp.dtype(e.invars[1].aval.dtype), str(e.params.get("precision")),
               str(e.params.get("preferred_element_type")))
        if jnp.dtype(e.invars[0].aval.dtype) != key[1]:
            continue
        groups.setdefault(key, []).append((i, lay))
    found = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        anchor = max(i for i, _ in members)
        members = [(i, lay) for i, lay in members
                   if all(u == -1 or u > anchor for u in g.uses.get(g.eqns[i].outvars[0], ()))]
        if len(members) < 2:
            continue
        eqns = [g.eqns[i] for i, _ in members]
        x = key[0]
        p = eqns[0].params

        def run(read, backend, eqns=eqns, members=members, x=x, p=p):
            from detjax.ops import _linalg
            ws = []
            for e, (_, lay) in zip(eqns, members):
                w = read(e.invars[1])
                ws.append(w[None] if lay == "dn" else w)
            outs = _linalg.head_projections(read(x), ws, precision=p.get("precision"),
                                            preferred_element_type=p.get("preferred_element_type"),
                                            backend=backend)
            return [o.reshape(e.outvars[0].aval.shape) for o, e in zip(outs, eqns)]

        note = (f"projections: {_shape(x)} by {len(eqns)} weights "
                f"({', '.join(_shape(e.invars[1]) for e in eqns)}) in one launch")
        found.append(Fusion("projections", anchor, frozenset(i for i, _ in members), run, note,
                            tuple(e.outvars[0] for e in eqns)))
    return found
