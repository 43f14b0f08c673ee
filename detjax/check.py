"""``detjax.check``: test the guarantees on your own function, and find where the bits diverge.

* ``batch_invariance(fn, *example_args)`` runs ``fn`` (jitted) on each example alone, inside batches
  of several sizes at several positions, under ``jax.vmap`` and repeatedly, and reports per output
  leaf whether the *batch*, *vmap* and *run-to-run* guarantees hold **bitwise**, with the largest
  absolute difference where they do not.
* ``find_divergence(fn, args_a, args_b)`` evaluates ``fn`` on two inputs equation by equation
  (recursing into ``jit`` / ``custom_jvp`` / ``custom_vjp`` / ``remat`` bodies), compares every
  intermediate value bitwise on the rows that should agree, and names the first primitive whose
  output differs, with its source line.

Both compare bit patterns (``-0.0 != +0.0``, NaN payloads count), never ``allclose``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as _core
from jax._src import source_info_util

from detjax.transform import _Interpreter, _merge_args, _open, _source, _split_args

__all__ = ["batch_invariance", "BatchInvarianceReport", "LeafReport", "GuaranteeResult",
           "find_divergence", "Divergence"]


# ---------------------------------------------------------------------------------------------
# Bitwise comparison helpers.

def _host(x) -> np.ndarray:
    """A host copy of an array; PRNG key arrays become their raw key data."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _bits(a: np.ndarray) -> np.ndarray:
    """Raw bit patterns, one trailing axis of words (works for any itemsize)."""
    a = np.ascontiguousarray(a)
    size = a.dtype.itemsize
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(size)
    if word is not None:
        return a.view(word).reshape(a.shape + (1,))
    return a.view(np.uint8).reshape(a.shape + (size,))


def _compare(a, b):
    """``(n_elements_differing, max_abs_difference)`` of two equal-shape arrays, bitwise.
    The max is over the differing elements (0.0 if they differ only in the sign of zero or a NaN
    payload; NaN if a NaN meets a number)."""
    a, b = _host(a), _host(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {a.dtype}{list(a.shape)} with {b.dtype}{list(b.shape)}")
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    diff = (_bits(a) != _bits(b)).any(axis=-1)
    n = int(diff.sum())
    if n == 0:
        return 0, 0.0
    try:
        da = np.abs(a[diff].astype(np.complex128 if np.iscomplexobj(a) else np.float64)
                    - b[diff].astype(np.complex128 if np.iscomplexobj(b) else np.float64))
    except (TypeError, ValueError):  # pragma: no cover - exotic dtypes: no magnitude
        return n, float("nan")
    da = np.real(da)
    if np.isnan(da).all():
        return n, float("nan")
    return n, float(np.nanmax(da))


def _max(a: float, b: float) -> float:
    """max that propagates NaN."""
    return a if a != a else (b if b != b else max(a, b))


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# batch_invariance

@dataclasses.dataclass
class GuaranteeResult:
    """One guarantee for one output leaf.

    ``ok``: True (holds bitwise), False (some element differs, or the check raised), None (not
    applicable: e.g. the batch check of an output without a batch axis, or run-to-run with
    ``n_runs < 2``). ``max_abs_diff`` / ``n_differ`` / ``n_compared``: over all comparisons.
    ``first``: the first failing case in words. ``by_batch_size``: batch check only,
    ``{batch size: max abs difference}``. ``note``: why not applicable, or the error."""
    name: str
    ok: bool | None = True
    max_abs_diff: float = 0.0
    n_differ: int = 0
    n_compared: int = 0
    first: str = ""
    note: str = ""
    by_batch_size: dict = dataclasses.field(default_factory=dict)

    def _add(self, a, b, where, batch_size=None):
        n, d = _compare(a, b)
        self.n_compared += int(np.size(_host(a)))
        if batch_size is not None:
            self.by_batch_size[batch_size] = _max(self.by_batch_size.get(batch_size, 0.0), d)
        if n:
            if self.ok and not self.first:
                self.first = where
            self.ok = False
            self.n_differ += n
            self.max_abs_diff = _max(self.max_abs_diff, d)

    def cell(self) -> str:
        if self.ok is None:
            return "n/a"
        if self.ok:
            return "ok"
        if self.note and not self.n_differ:
            return "ERROR"
        return f"DIFFERS {_fmt(self.max_abs_diff)}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["max_abs_diff"] = None if self.max_abs_diff != self.max_abs_diff else self.max_abs_diff
        d["by_batch_size"] = {str(k): (None if v != v else v) for k, v in self.by_batch_size.items()}
        return d


@dataclasses.dataclass
class LeafReport:
    """The guarantees for one output leaf: ``path`` (as ``jax.tree_util.keystr``), ``shape`` of one
    example's output (as computed alone), ``dtype``, and ``batch`` / ``vmap`` / ``run_to_run``."""
    path: str
    shape: tuple
    dtype: str
    batch: GuaranteeResult
    vmap: GuaranteeResult
    run_to_run: GuaranteeResult

    @property
    def guarantees(self):
        return (self.batch, self.vmap, self.run_to_run)

    @property
    def ok(self) -> bool:
        return all(g.ok is not False for g in self.guarantees)

    def to_dict(self) -> dict:
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype, "ok": self.ok,
                "batch": self.batch.to_dict(), "vmap": self.vmap.to_dict(),
                "run_to_run": self.run_to_run.to_dict()}


@dataclasses.dataclass
class BatchInvarianceReport:
    """What ``batch_invariance`` found. ``ok``: every applicable guarantee holds for every leaf;
    ``leaves``: one ``LeafReport`` per output leaf; ``str(report)`` is a readable table."""
    function: str
    n_examples: int
    batch_sizes: tuple
    positions: dict
    n_runs: int
    leaves: list

    @property
    def ok(self) -> bool:
        return all(leaf.ok for leaf in self.leaves)

    def __getitem__(self, path):
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(path)

    def to_dict(self) -> dict:
        return {"function": self.function, "ok": self.ok, "n_examples": self.n_examples,
                "batch_sizes": list(self.batch_sizes),
                "positions": {str(k): list(v) for k, v in self.positions.items()},
                "n_runs": self.n_runs, "leaves": [leaf.to_dict() for leaf in self.leaves]}

    def __str__(self):
        sets = ["{" + ",".join(map(str, p)) + "}" for p in self.positions.values()]
        pos = sets[0] if len(set(sets)) == 1 else ", ".join(sets)
        vm = any(leaf.vmap.ok is not None or "vmap=False" not in leaf.vmap.note
                 for leaf in self.leaves)
        lines = [f"detjax.check.batch_invariance({self.function}): "
                 f"{'OK: every guarantee holds bitwise' if self.ok else 'FAILED'}",
                 f"  {self.n_examples} example{'s' if self.n_examples != 1 else ''}, each alone vs "
                 f"inside batches of {', '.join(map(str, self.batch_sizes))} rows (example 0 at rows "
                 f"{pos}, every row compared)"
                 + ("; jax.vmap over single examples" if vm else "")
                 + (f"; {self.n_runs} runs" if self.n_runs > 1 else "")]
        head = ("output", "shape", "dtype", "batch", "vmap", "run-to-run")
        rows = [(leaf.path or "(output)", str(tuple(leaf.shape)), leaf.dtype,
                 *(g.cell() for g in leaf.guarantees)) for leaf in self.leaves]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        details = []
        for leaf in self.leaves:
            for g in leaf.guarantees:
                if g.ok is False:
                    what = (f"{g.n_differ} of {g.n_compared} elements differ, max |diff| "
                            f"{_fmt(g.max_abs_diff)}; first: {g.first}" if g.n_differ else g.note)
                    if g.by_batch_size and g.n_differ:
                        what += ("; max |diff| by batch size: " + ", ".join(
                            f"{b}: {_fmt(d)}" for b, d in g.by_batch_size.items()))
                    details.append(f"  {leaf.path or '(output)'} {g.name}: {what}")
        if details:
            lines.append("Differences (bitwise):")
            lines.extend(details)
        return "\n".join(lines)

    __repr__ = __str__


def _default_positions(b: int) -> tuple:
    return tuple(sorted({0, b // 2, b - 1}))


def _check_count(name, v, lo):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v}")
    return int(v)


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _check_vmap(flat, arrays, alone, reports, n, jit):
    def single(*xs):
        return flat(*[x[None] for x in xs])

    try:
        vf = jax.vmap(single)
        vouts = (jax.jit(vf) if jit else vf)(*arrays)
    except Exception as e:  # noqa: BLE001 - reported as a failed guarantee
        msg = f"jax.vmap(fn) raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for r in reports:
            r.vmap.ok, r.vmap.note = False, msg
        return
    for j, r in enumerate(reports):
        v = _host(vouts[j])
        for i in range(n):
            if v[i].shape != alone[i][j].shape:
                r.vmap.ok = False
                r.vmap.note = f"vmap output shape {v.shape} vs alone {alone[i][j].shape}"
                break
            r.vmap._add(v[i], alone[i][j], f"jax.vmap row {i} vs example {i} alone")


def batch_invariance(fn: Callable, *example_args, batch_sizes: Sequence[int] = (1, 2, 7),
                     positions: Sequence[int] | None = None, n_runs: int = 2,
                     jit: bool = True, vmap: bool = True) -> BatchInvarianceReport:
    """Check bitwise, per output leaf, that ``fn`` is batch-invariant, vmap-invariant and
    reproducible run to run.

    Args:
      fn: a function of batched arrays (pytrees allowed; non-array leaves are static).
      *example_args: the arguments, every array leaf batched along axis 0 with the same number
        ``N`` of examples. Example ``i`` alone is ``fn(*args[i:i+1])``.
      batch_sizes: batch sizes ``B`` to test. A batch of size ``B`` with example 0 at position
        ``p`` holds example ``(k - p) % N`` in row ``k`` (the examples cycled; with ``N == 1`` every
        row is example 0), and **every** row is compared with that example computed alone.
      positions: the positions ``p`` of example 0 inside each batch (negative counts from the end;
        positions ``>= B`` are skipped for that ``B``); default ``0``, ``B // 2`` and ``B - 1``.
      n_runs: the full batch of the ``N`` examples is computed ``n_runs`` times and compared with
        the first run (``n_runs < 2``: run-to-run is not checked).
      jit: run ``jax.jit(fn)`` (default; detjax's guarantees are for compiled programs).
      vmap: check the vmap guarantee (``False``: reported as not applicable).

    Guarantees, per output leaf:
      * batch: ``fn(batch)[k] == fn(batch[k:k+1])[0]``: only for leaves whose leading axis is the
        batch (size 1 alone, ``B`` in a batch of ``B``); others are "n/a".
      * vmap: ``jax.vmap(g)(xs)[i] == fn(xs[i:i+1])`` with ``g(x) = fn(x[None])`` run on single
        examples (any leaf). If ``jax.vmap`` raises, the guarantee fails with the error as note.
      * run-to-run: the repeated runs agree.

    Returns a ``BatchInvarianceReport`` (``.ok``, ``.leaves``, ``.to_dict()``, readable ``str``).
    """
    batch_sizes = tuple(_check_count("batch size", b, 1) for b in batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    n_runs = _check_count("n_runs", n_runs, 1)
    if positions is not None:
        positions = tuple(_check_count("position", p, -10**9) for p in positions)
    arrays, static, is_arr, treedef = _split_args(example_args, {})
    if not arrays:
        raise ValueError("batch_invariance needs at least one array argument batched along axis 0")
    ns = {int(a.shape[0]) if getattr(a, "ndim", 0) else None for a in arrays}
    if None in ns or len(ns) != 1:
        shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
        raise ValueError("every array argument must be batched along axis 0 with the same number "
                         f"of examples; got shapes {shapes}")
    n = ns.pop()
    if n < 1:
        raise ValueError("the example arguments hold no example (leading dimension 0)")
    arrays = [jnp.asarray(a) for a in arrays]

    out_tree: list = []

    def flat(*arrs):
        a, _ = _merge_args(arrs, static, is_arr, treedef)
        out = fn(*a)
        leaves, tree = jax.tree_util.tree_flatten_with_path(out)
        out_tree[:] = [[jax.tree_util.keystr(p) for p, _ in leaves]]
        return [leaf for _, leaf in leaves]

    f = jax.jit(flat) if jit else flat

    def take(idx):
        idx = jnp.asarray(np.asarray(idx, np.int32))
        return [jnp.take(a, idx, axis=0) for a in arrays]

    # Each example alone.
    alone = [[_host(o) for o in f(*take([i]))] for i in range(n)]
    paths = out_tree[0]
    n_leaves = len(paths)
    batched = [all(o[j].ndim >= 1 and o[j].shape[0] == 1 for o in alone) for j in range(n_leaves)]
    stacked = [np.concatenate([o[j] for o in alone], axis=0) if batched[j] else None
               for j in range(n_leaves)]
    reports = [LeafReport(p, alone[0][j].shape[1:] if batched[j] else alone[0][j].shape,
                          str(alone[0][j].dtype), GuaranteeResult("batch"), GuaranteeResult("vmap"),
                          GuaranteeResult("run-to-run")) for j, p in enumerate(paths)]
    for j, r in enumerate(reports):
        if not batched[j]:
            r.batch.ok = None
            r.batch.note = "no leading batch axis (shape differs from [1, ...] alone)"

    # Batches.
    used_positions: dict = {}
    for b in batch_sizes:
        ps = _default_positions(b) if positions is None else tuple(
            sorted({p % b if -b <= p < 0 else p for p in positions if -b <= p < b}))
        used_positions[b] = ps
        for p in ps:
            idx = np.array([(k - p) % n for k in range(b)])
            outs = f(*take(idx))
            for j, r in enumerate(reports):
                if not batched[j]:
                    continue
                o = _host(outs[j])
                if o.ndim < 1 or o.shape[0] != b:
                    r.batch.ok = False
                    r.batch.note = (f"batch of {b}: output shape {o.shape} has no leading axis "
                                    f"of size {b}")
                    continue
                for k in range(b):
                    r.batch._add(o[k], stacked[j][idx[k]],
                                 f"batch size {b}, row {k} (example {idx[k]}) vs that example alone",
                                 batch_size=b)

    # vmap over single examples.
    if not vmap:
        for r in reports:
            r.vmap.ok, r.vmap.note = None, "not checked (vmap=False)"
    else:
        _check_vmap(flat, arrays, alone, reports, n, jit)

    # Run to run.
    if n_runs < 2:
        for r in reports:
            r.run_to_run.ok, r.run_to_run.note = None, "n_runs < 2"
    else:
        full = take(np.arange(n))
        first = [_host(o) for o in f(*full)]
        for run in range(1, n_runs):
            again = f(*full)
            for j, r in enumerate(reports):
                r.run_to_run._add(_host(again[j]), first[j], f"run {run + 1} vs run 1 (batch of {n})")

    return BatchInvarianceReport(_fn_name(fn), n, batch_sizes, used_positions, n_runs, reports)


# ---------------------------------------------------------------------------------------------
# find_divergence

#: Call-like primitives whose bodies are evaluated equation by equation (their primal body).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
           "remat": "jaxpr"}


def _body(eqn):
    key = _INLINE.get(eqn.primitive.name)
    if key is None:
        return None
    p = eqn.params
    return p.get(key, p.get("call_jaxpr", p.get("fun_jaxpr")))


class _Stop(Exception):
    pass


class _Stepper(_Interpreter):
    """The ``deterministic`` interpreter's evaluation loop, with every primitive bound as is (no
    replacement) and ``visit(stepper, eqn, invals, outs)`` called after each one, in evaluation
    order; call bodies (jit, custom_jvp/vjp, remat) are entered rather than bound."""

    def __init__(self, visit):
        super().__init__(strict=False, backend=None, fuse=False)  # primitives one by one, as traced
        self.visit = visit
        self.path: list = []
        self.index = 0

    def eval_eqn(self, eqn, invals):
        sub = _body(eqn)
        if sub is not None:
            name = eqn.primitive.name
            label = eqn.params.get("name")
            self.ctx.append(self._src(eqn))
            self.path.append(f"{name}({label})" if isinstance(label, str) and label else name)
            try:
                outs = self.eval_closed(sub, *invals)
            finally:
                self.path.pop()
                self.ctx.pop()
            return outs if eqn.primitive.multiple_results else outs[0]
        outs = self._bind(eqn, invals)
        self.visit(self, eqn, invals, list(outs) if eqn.primitive.multiple_results else [outs])
        self.index += 1
        return outs


@dataclasses.dataclass
class Divergence:
    """What ``find_divergence`` found. ``bool(d)`` is ``d.diverged``.

    Fields: ``diverged``; ``primitive`` (name of the first primitive whose output differs),
    ``source`` (the user's source line), ``path`` (the enclosing calls, outermost first),
    ``index`` (its position in evaluation order), ``output`` (which output of the primitive),
    ``shape_a`` / ``shape_b`` / ``dtype`` of that output, ``max_abs_diff``, ``n_differ`` /
    ``n_compared`` (elements in the compared slices), ``inputs_equal`` (True: every comparable
    input agreed, so the primitive itself made the difference, e.g. a reduction order; False: an
    input (a constant, or a value the rule could not compare) already differed; None: no input was
    comparable), ``params`` (the primitive's parameters, abbreviated), ``stack`` (up to 6 user
    frames, innermost first), ``n_equations`` /
    ``n_compared_values`` / ``n_skipped_values`` (values the selection rule could not compare),
    ``note`` (e.g. the two traces differ in structure)."""
    diverged: bool
    primitive: str | None = None
    source: str | None = None
    path: str = ""
    index: int | None = None
    output: int = 0
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype: str | None = None
    max_abs_diff: float | None = None
    n_differ: int = 0
    n_compared: int = 0
    inputs_equal: bool | None = None
    params: str = ""
    stack: list = dataclasses.field(default_factory=list)
    n_equations: int = 0
    n_compared_values: int = 0
    n_skipped_values: int = 0
    note: str = ""

    def __bool__(self):
        return self.diverged

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["max_abs_diff"] is not None and d["max_abs_diff"] != d["max_abs_diff"]:
            d["max_abs_diff"] = None
        return d

    def __str__(self):
        head = "detjax.check.find_divergence"
        stats = (f"{self.n_compared_values} intermediate values compared bitwise, "
                 f"{self.n_skipped_values} not comparable under the selection rule, "
                 f"{self.n_equations} equations in run a")
        if not self.diverged:
            return f"{head}: no divergence ({stats})" + (f"\n  note: {self.note}" if self.note else "")
        if self.primitive is None or self.index is None:
            return f"{head}: DIVERGED: {self.note}\n  ({stats})"
        cause = {True: "every comparable input agrees: this primitive itself produced the "
                       "difference (e.g. its reduction order depends on the shape)",
                 False: "an input already differs (a constant, or a value the selection rule "
                        "could not compare)",
                 None: "no input was comparable"}[self.inputs_equal]
        lines = [f"{head}: first divergence at equation {self.index}",
                 f"  primitive   {self.primitive}" + (f"  [{self.params}]" if self.params else ""),
                 f"  source      {self.source}"]
        for fr in self.stack[1:]:
            lines.append(f"  called from {fr}")
        if self.path:
            lines.append(f"  inside      {self.path}")
        lines += [f"  output      #{self.output}: {self.dtype}{list(self.shape_a)} (a) vs "
                  f"{self.dtype}{list(self.shape_b)} (b)",
                  f"  difference  {self.n_differ} of {self.n_compared} compared elements differ; "
                  f"max |a - b| = {_fmt(self.max_abs_diff)}",
                  f"  inputs      {cause}",
                  f"  ({stats})"]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    __repr__ = __str__


def _flat_info(jaxpr, taint_in) -> tuple:
    """The equations the ``_Stepper`` visits, in its order, as ``(key, in_taint, out_taint)``:
    ``key = (primitive, source line)`` for the alignment, and per input / output whether the value
    depends on the function's arguments. Returns ``(records, taint of jaxpr.outvars)``."""
    env: dict = {}

    def rd(v):
        return False if isinstance(v, _core.Literal) else env.get(v, False)

    for v, t in zip(jaxpr.invars, taint_in):
        env[v] = t
    out = []
    for eqn in jaxpr.eqns:
        tin = [rd(v) for v in eqn.invars]
        sub = _body(eqn)
        if sub is not None:
            recs, tout = _flat_info(_open(sub)[0], tin)
            out.extend(recs)
        else:
            tout = [any(tin)] * len(eqn.outvars)
            out.append(((eqn.primitive.name, _source(eqn)), tin, tout))
        for v, t in zip(eqn.outvars, tout):
            env[v] = t
    return out, [rd(v) for v in jaxpr.outvars]


def _stack(eqn, n=6) -> list:
    try:
        frames = (f for f in source_info_util.user_frames(eqn.source_info.traceback)
                  if f.file_name != __file__)  # not this module's tracing wrapper
        return [f"{f.file_name}:{f.start_line} ({f.function_name})"
                for f in itertools.islice(frames, n)]
    except Exception:  # noqa: BLE001 - best effort
        return []


def _as_args(args) -> tuple:
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _leading(arrays) -> int | None:
    ns = {int(a.shape[0]) for a in arrays if getattr(a, "ndim", 0) >= 1}
    return ns.pop() if len(ns) == 1 else None


def _default_selector(n_a, n_b, row_a, row_b):
    """The default rule (see ``find_divergence``): ``pair(va, vb, tainted) -> (sa, sb) | None``."""

    def block(v, ax, m, row):
        return v[(slice(None),) * ax + (slice(row * m, (row + 1) * m),)]

    def pair(va, vb, tainted):
        sa, sb = np.shape(va), np.shape(vb)
        if n_a is None or n_b is None:
            return (va, vb) if sa == sb else None
        if sa == sb:
            if not tainted or (n_a == 1 and n_b == 1):
                return va, vb
            if n_a != n_b:
                return None  # depends on the batch but not shaped by it (padding, a batch sum)
            for ax, size in enumerate(sa):  # same batch size: the first axis holding N blocks
                if size % n_a == 0:
                    m = size // n_a
                    return block(va, ax, m, row_a), block(vb, ax, m, row_b)
            return None
        if len(sa) != len(sb):
            return None
        axes = [i for i, (x, y) in enumerate(zip(sa, sb)) if x != y]
        if len(axes) != 1:
            return None
        ax = axes[0]
        if sa[ax] % n_a or sb[ax] % n_b or sa[ax] // n_a != sb[ax] // n_b:
            return None
        m = sa[ax] // n_a
        return block(va, ax, m, row_a), block(vb, ax, m, row_b)

    return pair


def _short_params(eqn) -> str:
    out = []
    for k, v in eqn.params.items():
        if k in ("out_sharding", "sharding", "accuracy") or v is None:
            continue
        if hasattr(v, "eqns") or hasattr(v, "jaxpr") or callable(v):
            continue
        s = str(v).replace("\n", " ")
        out.append(f"{k}={s if len(s) <= 60 else s[:57] + '...'}")
    return ", ".join(out)


def find_divergence(fn: Callable, args_a, args_b, *, select_a: Callable | None = None,
                    select_b: Callable | None = None, row_a: int = 0,
                    row_b: int = 0) -> Divergence:
    """Evaluate ``fn(*args_a)`` and ``fn(*args_b)`` equation by equation and name the first
    primitive whose output differs bitwise on the part where the two should agree.

    Args:
      fn: a function of arrays (pytrees allowed; non-array leaves are static). Its jaxpr is
        evaluated one primitive at a time (as in eager mode), entering ``jit`` / ``pjit``,
        ``custom_jvp`` / ``custom_vjp`` (their primal body) and ``remat`` bodies; ``scan`` /
        ``while`` / ``cond`` are run (and compared) as one unit each.
      args_a, args_b: the positional arguments of the two runs (a tuple; a single array is taken
        as the only argument). Typically ``args_a`` = one example alone, ``args_b`` = a batch
        holding it at row ``row_b``. Pass the smaller input as ``args_a``: every intermediate of
        run a is kept in memory.
      select_a, select_b: ``select(value) -> array or None`` maps every intermediate value of run a
        (resp. b) to the slice to compare (``None``: skip it). If either is given the default rule
        is off, and a missing one is the identity. Values whose selected shapes or dtypes differ
        are skipped.
      row_a, row_b: rows for the default rule.

    The default rule, for an intermediate ``va`` of run a and ``vb`` of run b at the same equation
    (``N_a``, ``N_b`` = the leading dimension shared by the array arguments of each run; a value
    "depends on the arguments" if it is computed from them, which is traced statically):
      * shapes differ in exactly one axis, of sizes ``N_a * m`` and ``N_b * m``: the blocks
        ``[row_a * m, (row_a + 1) * m)`` of a and ``[row_b * m, (row_b + 1) * m)`` of b along that
        axis are compared (``m = 1``: row ``row_a`` vs row ``row_b``; ``m > 1`` covers a batch axis
        merged with another one, e.g. ``[B * T, D]``, or moved, e.g. ``[T, B, D]``);
      * same shape, not depending on the arguments (weights, constants, ``iota``), or
        ``N_a == N_b == 1``: compared whole;
      * same shape, depending on the arguments, ``N_a == N_b``: the blocks of the first axis whose
        size is a multiple of ``N`` (as above);
      * otherwise (e.g. a batch padded to a tile size, a sum over the batch) the value is skipped
        (counted in ``n_skipped_values``).

    The two programs are aligned by (primitive, source line) in evaluation order
    (``difflib.SequenceMatcher``): equations that exist in only one of them (shape-dependent code,
    e.g. a transpose or padding some shapes need) are not compared, and the ``note`` says how many.
    Evaluation is op by op, like eager mode: a difference that only arises from how XLA fuses the
    jitted program is not seen, and one seen here may be absent in the jitted program.

    Returns a ``Divergence``; ``bool(result)`` is False (and ``result.diverged`` is False) when
    no compared value differs.
    """
    args_a, args_b = _as_args(args_a), _as_args(args_b)
    arr_a, st_a, isa_a, tree_a = _split_args(args_a, {})
    arr_b, st_b, isa_b, tree_b = _split_args(args_b, {})
    arr_a = [jnp.asarray(a) for a in arr_a]
    arr_b = [jnp.asarray(a) for a in arr_b]
    if len(arr_a) != len(arr_b):
        raise ValueError(f"args_a has {len(arr_a)} array leaves but args_b has {len(arr_b)}")
    n_a, n_b = _leading(arr_a), _leading(arr_b)
    for name, r, nn in (("row_a", row_a, n_a), ("row_b", row_b, n_b)):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0 or (
                nn is not None and r >= nn):
            raise ValueError(f"{name} must be an int in [0, {nn}); got {r!r}")

    if select_a is None and select_b is None:
        pair = _default_selector(n_a, n_b, int(row_a), int(row_b))
    else:
        sa_fn = select_a or (lambda v: v)
        sb_fn = select_b or (lambda v: v)

        def pair(va, vb, tainted):
            x, y = sa_fn(va), sb_fn(vb)
            if x is None or y is None:
                return None
            return x, y

    def comparable(va, vb, tainted=True):
        """``(sa, sb)`` host arrays to compare, or None."""
        try:
            va, vb = _host(va), _host(vb)
        except Exception:  # noqa: BLE001 - tokens and other non-arrays
            return None
        got = pair(va, vb, tainted)
        if got is None:
            return None
        x, y = np.asarray(got[0]), np.asarray(got[1])
        if x.shape != y.shape or x.dtype != y.dtype:
            return None
        return x, y

    def trace(arrays, static, is_arr, treedef):
        def flat_fn(*arrs):
            a, _ = _merge_args(arrs, static, is_arr, treedef)
            return jax.tree_util.tree_leaves(fn(*a))
        return jax.make_jaxpr(flat_fn)(*arrays)

    closed_a = trace(arr_a, st_a, isa_a, tree_a)
    closed_b = trace(arr_b, st_b, isa_b, tree_b)

    # Align the two programs: the equations in evaluation order (call bodies entered), keyed by
    # primitive and source line. Shape-dependent library code (a transpose only for some shapes,
    # a different padding) inserts or drops equations; those have no counterpart and are skipped.
    info_a = _flat_info(closed_a.jaxpr, [True] * len(arr_a))[0]
    info_b = _flat_info(closed_b.jaxpr, [True] * len(arr_b))[0]
    keys_a, keys_b = [r[0] for r in info_a], [r[0] for r in info_b]
    match = {}  # index in b -> index in a
    sm = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
    for blk in sm.get_matching_blocks():
        for t in range(blk.size):
            match[blk.b + t] = blk.a + t
    wanted_a = set(match.values())
    unmatched_b = len(keys_b) - len(match)

    # Run a: keep the outputs of the matched equations (the default rule needs both shapes).
    rec_a: dict = {}

    def record(st, eqn, invals, outs):
        if st.index in wanted_a:
            rec_a[st.index] = outs

    _Stepper(record).eval_jaxpr(closed_a.jaxpr, closed_a.consts, *arr_a)

    # Inputs of the two runs, for the note.
    notes = []
    for i, (x, y) in enumerate(zip(arr_a, arr_b)):
        c = comparable(x, y)
        if c is not None and _compare(*c)[0]:
            notes.append(f"array argument {i} already differs in the compared slice")
    if unmatched_b or len(keys_a) != len(match):
        notes.append(f"the two programs differ in structure (shape-dependent code): "
                     f"{len(keys_a) - len(match)} equations of a and {unmatched_b} of b have no "
                     "counterpart and were not compared")

    stats = {"compared": 0, "skipped": 0}
    found: dict = {}

    def check(st, eqn, invals, outs):
        ka = match.get(st.index)
        if ka is None:
            return
        taint = info_b[st.index][2]
        for j, (va, vb) in enumerate(zip(rec_a[ka], outs)):
            c = comparable(va, vb, taint[j])
            if c is None:
                stats["skipped"] += 1
                continue
            stats["compared"] += 1
            nd, d = _compare(*c)
            if nd:
                found.update(index=ka, index_b=st.index, eqn=eqn, src=st._src(eqn),
                             path=" > ".join(st.path), output=j, n_differ=nd, max_abs_diff=d,
                             n_compared=int(c[0].size), shape_a=tuple(np.shape(va)),
                             shape_b=tuple(np.shape(vb)), dtype=str(_host(vb).dtype),
                             invals_b=list(invals))
                raise _Stop

    try:
        _Stepper(check).eval_jaxpr(closed_b.jaxpr, closed_b.consts, *arr_b)
    except _Stop:
        pass
    common = dict(n_equations=len(keys_a), n_compared_values=stats["compared"],
                  n_skipped_values=stats["skipped"])
    if not found:
        return Divergence(False, note="; ".join(notes), **common)
    eqn = found["eqn"]

    # Inputs of the diverging equation in run a: run a again up to it.
    target = found["index"]
    got_a: list = []

    def grab(st, e, invals, outs):
        if st.index == target:
            got_a.extend(invals)
            raise _Stop

    try:
        _Stepper(grab).eval_jaxpr(closed_a.jaxpr, closed_a.consts, *arr_a)
    except _Stop:
        pass
    inputs_equal = None
    for va, vb, t in zip(got_a, found["invals_b"], info_b[found["index_b"]][1]):
        c = comparable(va, vb, t)
        if c is None:
            continue
        same = _compare(*c)[0] == 0
        inputs_equal = same if inputs_equal is None else (inputs_equal and same)
    return Divergence(
        True, primitive=eqn.primitive.name, source=found["src"], path=found["path"],
        index=target, output=found["output"], shape_a=found["shape_a"], shape_b=found["shape_b"],
        dtype=found["dtype"], max_abs_diff=found["max_abs_diff"], n_differ=found["n_differ"],
        n_compared=found["n_compared"], inputs_equal=inputs_equal, params=_short_params(eqn),
        stack=_stack(eqn),
        note="; ".join(notes), **common)
