"""detjax reliability: hypothesis fuzzing of every public op, stress runs, and the bad-input table.

    python scripts/reliability.py --profile ci   --out results/reliability/cpu-ci
    python scripts/reliability.py --profile long --out results/reliability/h100-long   (on the GPU)
    python scripts/reliability.py --bad-input-table [--out results/reliability]
    python scripts/reliability.py --profile ci --only fuzz|stress --ops sum,matmul

Fuzzing: for every op of ``detjax.ops`` (and ``detjax.deterministic`` on a few jnp functions)
hypothesis draws a configuration (dtype, shapes with 1 / primes / non-aligned sizes, axes, options,
batch size) from a bounded pool (so compiled programs are reused), then fresh data, row positions and
neighbours. Every case checks, bitwise (bit patterns, so -0.0 != +0.0 and NaN payloads count):

* ``run``:   the same call twice gives the same bits;
* ``batch``: row ``i`` of a batch equals the same row computed alone (batch size 1);
* ``neigh``: row ``i`` equals the same row at another position among other neighbours;
* ``vmap``:  ``jax.vmap`` of the per-example function equals the batched call;
* ``acc``:   relative Frobenius error against a float64 numpy reference below a per-op tolerance
  (exact equality for max/min/argmax/argmin/cummax/cummin);
* ``decode=prefill`` (decode_attention only): equals ``attention`` with the same positions/lengths;
* ``error``: the call raised (a crash on valid input).

Stress: the tiny Gemma model's jitted forward called N times, and generation of one prompt inside
shuffled batches of other prompts M times, from one thread and from several at once: every output
hash must be the same (exactly one distinct hash).

Outputs under ``--out``: ``fuzz.json``, ``fuzz.md``, ``stress.json``, ``fuzz_cases.png``,
``fuzz_error_ratio.png`` (figures when matplotlib is present); ``--bad-input-table`` writes
``bad_input.md``. A short table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import detjax  # noqa: E402
from detjax import ops  # noqa: E402

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
DTYPES = (BF16, F16, F32)
DNAME = {BF16: "bf16", F16: "f16", F32: "f32"}

# Relative Frobenius tolerances against float64 (README: f32 matmul 2e-6, f32 reductions 1e-5,
# f16 1.5e-3, bf16 8e-3; the output is rounded once to its dtype). Attention rounds the
# probabilities to the input dtype before the PV product (tests/test_attention.py: 2e-5/3e-3/2e-2).
# ``deterministic`` runs whole jnp functions whose elementwise glue rounds at every step in the
# input dtype, so its bound is a few output roundings.
TOL = {
    "default": {BF16: 8e-3, F16: 1.5e-3, F32: 1e-5},
    "matmul": {BF16: 8e-3, F16: 1.5e-3, F32: 2e-6},
    "attention": {BF16: 2e-2, F16: 3e-3, F32: 2e-5},
    "deterministic": {BF16: 3e-2, F16: 4e-3, F32: 2e-5},
}



def matmul_tol(dtype, k):
    """Tolerance of a contraction over ``k`` elements whose result has ``dtype``. f32 results carry
    the rounding of a length-``k`` f32 accumulation, which grows with ``k``: 2e-6 up to k = 256,
    then ``2e-6 * sqrt(k / 256)`` (the H100's tensor cores measured 2.13e-6 at k = 1031, run s4-7;
    half-precision results are dominated by the one output rounding)."""
    base = TOL["matmul"][dtype]
    return base * max(1.0, math.sqrt(k / 256)) if dtype == F32 else base


PROFILES = {
    # ci: CPU interpret mode, where every new shape costs a compile (~0.3-1 s): 2 configurations
    # per op (dtypes rotated across ops so all three are covered), ~20 cases each.
    "ci": dict(cases=20, configs=2, dims=(1, 3, 7, 130), batch=(2, 5), max_elems=1024,
               stress_forwards=200, stress_generations=20, threads=8, op_time_limit=60.0,
               stress_batch_sizes=(1, 2, 3, 4), stress_time_limit=600.0),
    # long: >= 1000 cases per op (CPU and GPU); 4 configurations per op.
    # Most ops reach 1000 cases in 10-20 s; on the GPU the attention ops spend ~100 s compiling
    # their Triton kernels first, hence 150 s per op at most. An op stopped by the limit is marked
    # '*' in the table. Stress generation uses batch sizes 1 and 3 (4 compiled programs).
    "long": dict(cases=1000, configs=4, dims=(1, 2, 3, 5, 7, 13, 31, 64, 97, 128, 130, 257, 1031),
                 batch=(1, 2, 3, 5, 8, 17), max_elems=8192, stress_forwards=10000,
                 stress_generations=1000, threads=8, op_time_limit=150.0,
                 stress_batch_sizes=(1, 3), stress_time_limit=150.0),
}

CHECKS = ("run", "batch", "neigh", "vmap", "acc", "decode=prefill", "error")


# ---------------------------------------------------------------------------------------------
# Helpers

def bits(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def to64(x) -> np.ndarray:
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return np.asarray(x.astype(jnp.float32), np.float64)
    return np.asarray(x)


def rel_frobenius(out, ref, scale=None) -> float:
    """Relative Frobenius error on the finite entries; inf if the non-finite patterns differ.

    ``scale`` (same shape as ``ref``) replaces ``ref`` in the denominator: a sum's rounding error is
    bounded relative to the sum of magnitudes, not to a sum that cancels.
    """
    out, ref = to64(out), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        return float("inf")
    fo, fr = np.isfinite(out), np.isfinite(ref)
    if not np.array_equal(fo, fr):
        return float("inf")
    if not np.array_equal(np.isnan(out), np.isnan(ref)):
        return float("inf")
    inf = ~fr & ~np.isnan(ref)
    if not np.array_equal(out[inf], ref[inf]):
        return float("inf")
    with np.errstate(all="ignore"):
        d = np.linalg.norm((out - ref)[fr])
    n = np.linalg.norm((ref if scale is None else np.asarray(scale, np.float64))[fr])
    if d == 0:
        return 0.0
    return float(d / max(n, 1e-30))


def stable_hash(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Configurations: what one op is fuzzed with. A configuration fixes every shape and static option
# (so it compiles three programs: the batch, the single row, the vmap); cases draw data, row
# positions and neighbours.

@dataclasses.dataclass
class Config:
    op: str
    desc: str
    dtype: Any
    batch: int
    batched: Callable            # f(*batched_args, *const_args) -> output with leading batch dim
    single: Callable             # f(*example_args, *const_args) -> one example's output (for vmap)
    gen: Callable                # gen(rng) -> (batched_args: list, const_args: list) of jnp arrays
    ref: Callable                # ref(batched_args, const_args) -> float64 numpy (or exact) output
    tol: float | None            # None: exact equality
    extra: Callable | None = None  # (batched_args, const_args) -> output bitwise equal to batched
    scale: Callable | None = None  # (batched_args, const_args) -> float64 magnitude the error is
    #                                relative to (default: the reference itself)
    _jit: dict = dataclasses.field(default_factory=dict)

    def jitted(self, which):
        if which not in self._jit:
            if which == "batched":
                f = jax.jit(self.batched)
            elif which == "vmap":
                nb = len(self.gen(np.random.default_rng(0))[0])
                f = jax.jit(lambda *a: jax.vmap(self.single, in_axes=(0,) * nb + (None,) * (len(a) - nb))(*a))
            else:
                f = jax.jit(self.extra)
            self._jit[which] = f
        return self._jit[which]


def _randn(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _shape(rng, dims, rank, max_elems, fixed=1):
    for _ in range(100):
        s = tuple(int(rng.choice(dims)) for _ in range(rank))
        if math.prod(s) * fixed <= max_elems:
            return s
    return tuple(1 for _ in range(rank))


def _axis_choice(rng, rank, allow_none=True, allow_tuple=True):
    """An axis argument for an example of rank ``rank``: int (pos/neg), tuple, or None."""
    kinds = ["int"] + (["tuple"] if allow_tuple and rank > 1 else []) + (["none"] if allow_none else [])
    k = rng.choice(kinds)
    if k == "none":
        return None
    if k == "int":
        a = int(rng.integers(0, rank))
        return a - rank if rng.random() < 0.5 else a
    n = int(rng.integers(1, rank + 1))
    axes = sorted(rng.choice(rank, n, replace=False).tolist())
    return tuple(a - rank if rng.random() < 0.3 else a for a in axes)


def _batched_axis(axis, rank):
    """Example axis -> the same axes of the batched array (leading batch dim)."""
    if axis is None:
        return tuple(range(1, rank + 1))
    if isinstance(axis, tuple):
        return tuple(a + 1 if a >= 0 else a for a in axis)
    return axis + 1 if axis >= 0 else axis


def _np_axes(axis, rank):
    """Batched numpy axes (tuple of non-negative ints)."""
    b = _batched_axis(axis, rank)
    b = b if isinstance(b, tuple) else (b,)
    return tuple(a % (rank + 1) for a in b)


# --- contractions -----------------------------------------------------------------------------

def cfg_matmul(rng, dtype, p):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    variant = rng.choice(["vec_mat", "rows_mat", "mat_vec", "batched_b"])
    M, K, N = (_shape(rng, d, 3, p["max_elems"] * 4))
    if variant == "vec_mat":      # x [B, K] @ w [K, N]
        xs, ws, bw = (B, K), (K, N), False
    elif variant == "rows_mat":   # x [B, M, K] @ w [K, N]
        xs, ws, bw = (B, M, K), (K, N), False
    elif variant == "mat_vec":    # x [B, M, K] @ w [K]
        xs, ws, bw = (B, M, K), (K,), False
    else:                         # x [B, M, K] @ w [B, K, N]
        xs, ws, bw = (B, M, K), (B, K, N), True

    def gen(r):
        s = float(r.choice([1.0, 0.125, 4.0]))
        x, w = _randn(r, xs, dtype, s), _randn(r, ws, dtype)
        return ([x, w], []) if bw else ([x], [w])

    return Config("matmul", f"{variant} x{xs} w{ws}", dtype, B,
                  batched=lambda x, w: ops.matmul(x, w), single=lambda x, w: ops.matmul(x, w),
                  gen=gen, ref=lambda b, c: np.matmul(*(to64(a) for a in b + c)),
                  tol=matmul_tol(dtype, K))


def cfg_dot_general(rng, dtype, p):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    variant = rng.choice(["nk", "kn", "two_contract", "batch_dims"])
    A, C1, C2 = _shape(rng, d, 3, p["max_elems"] * 4)
    if variant == "kn":
        ls, rs, dn = (B, A, C1), (C1, C2), (((2,), (0,)), ((), ()))
    elif variant == "nk":
        ls, rs, dn = (B, A, C1), (C2, C1), (((2,), (1,)), ((), ()))
    elif variant == "two_contract":
        ls, rs, dn = (B, C1, C2), (C2, A, C1), (((1, 2), (2, 0)), ((), ()))
    else:
        ls, rs, dn = (B, A, C1), (B, C1, C2), (((2,), (1,)), ((0,), (0,)))
    bw = variant == "batch_dims"
    pet = rng.choice([None, "float32"]) if dtype != F32 else None
    sdn = dn if not bw else (((1,), (0,)), ((), ()))

    def gen(r):
        x, w = _randn(r, ls, dtype), _randn(r, rs, dtype)
        return ([x, w], []) if bw else ([x], [w])

    def single(x, w):
        ((lc, rc), _) = sdn if bw else dn
        if not bw:  # the example lost dim 0: shift lhs dims
            lc = tuple(a - 1 for a in lc)
        return ops.dot_general(x, w, ((lc, rc), ((), ())), preferred_element_type=pet)

    def ref(b, c):
        x, w = (to64(a) for a in b + c)
        (lc, rc), (lb, rb) = dn
        if bw:
            return np.einsum("bac,bcn->ban", x, w)
        return np.tensordot(x, w, (lc, rc))

    return Config("dot_general", f"{variant} lhs{ls} rhs{rs} pet={pet}", dtype, B,
                  batched=lambda x, w: ops.dot_general(x, w, dn, preferred_element_type=pet),
                  single=single, gen=gen, ref=ref,
                  tol=matmul_tol(F32 if pet == "float32" else dtype, C1 * (C2 if variant == "two_contract" else 1)))


EINSUMS = [("bk,kn->bn", "k,kn->n"), ("bmk,kn->bmn", "mk,kn->mn"), ("bhk,nk->bhn", "hk,nk->hn"),
           ("bk,kn,np->bp", "k,kn,np->p"), ("bij,j->bi", "ij,j->i"), ("bij->bi", "ij->i"),
           ("bkz,kn->bn", "kz,kn->n")]


def cfg_einsum(rng, dtype, p):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    sub, ssub = EINSUMS[int(rng.integers(len(EINSUMS)))]
    letters = sorted(set(sub.replace(",", "").replace("->", "")) - {"b"})
    size = dict(zip(letters, _shape(rng, d, len(letters), p["max_elems"] * 4)))
    size["b"] = B
    terms = sub.split("->")[0].split(",")
    shapes = [tuple(size[c] for c in t) for t in terms]

    def gen(r):
        arrs = [_randn(r, s, dtype) for s in shapes]
        return [arrs[0]], arrs[1:]

    return Config("einsum", f"{sub} {dict(sorted(size.items()))}", dtype, B,
                  batched=lambda *a: ops.einsum(sub, *a), single=lambda *a: ops.einsum(ssub, *a),
                  gen=gen, ref=lambda b, c: np.einsum(sub, *(to64(a) for a in b + c)),
                  tol=(matmul_tol(dtype, math.prod(size[c] for c in set(letters) - set(sub.split("->")[1])))
                       if len(terms) < 3 else TOL["default"][dtype]))


# --- reductions ---------------------------------------------------------------------------------

def _reduce_cfg(name, rng, dtype, p, *, where_ok, keepdims_ok, allow_none=True, allow_tuple=True):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    rank = int(rng.integers(1, 4))
    shape = _shape(rng, d, rank, p["max_elems"])
    axis = _axis_choice(rng, rank, allow_none, allow_tuple)
    keepdims = bool(rng.random() < 0.3) if keepdims_ok else False
    use_where = bool(where_ok and rng.random() < 0.3)
    return B, rank, shape, axis, keepdims, use_where


def _np_reduce(fn, x, axes, keepdims, where=None):
    if where is not None:
        return fn(x, axes, keepdims, where)
    return fn(x, axes, keepdims, None)


def _lse64(x, axes, keepdims, where):
    if where is not None:
        x = np.where(where, x, -np.inf)
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        r = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axes)


def _sum64(x, axes, keepdims, where):
    return np.sum(np.where(where, x, 0.0) if where is not None else x, axis=axes, keepdims=keepdims)


def _mean64(x, axes, keepdims, where):
    if where is None:
        return np.mean(x, axis=axes, keepdims=keepdims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.sum(np.where(where, x, 0.0), axis=axes, keepdims=keepdims)
                / np.sum(where, axis=axes, keepdims=keepdims))


REDUCE_REF = {"sum": _sum64, "mean": _mean64, "logsumexp": _lse64,
              "max": lambda x, a, k, w: np.max(x, axis=a, keepdims=k),
              "min": lambda x, a, k, w: np.min(x, axis=a, keepdims=k)}


def cfg_reduce(name):
    def make(rng, dtype, p):
        where_ok = name in ("sum", "mean", "logsumexp")
        B, rank, shape, axis, keepdims, use_where = _reduce_cfg(name, rng, dtype, p,
                                                                where_ok=where_ok, keepdims_ok=True)
        f = getattr(ops, name)
        bax = _batched_axis(axis, rank)
        nax = _np_axes(axis, rank)

        def gen(r):
            x = _randn(r, (B,) + shape, dtype, float(r.choice([1.0, 0.1, 10.0])))
            if use_where:
                return [x, jnp.asarray(r.random((B,) + shape) < 0.8)], []
            return [x], []

        if use_where:
            batched = lambda x, m: f(x, bax, keepdims, where=m)
            single = lambda x, m: f(x, axis, keepdims, where=m)
        else:
            batched = lambda x: f(x, bax, keepdims)
            single = lambda x: f(x, axis, keepdims)

        def ref(b, c):
            x = to64(b[0])
            w = np.asarray(b[1]) if use_where else None
            r = REDUCE_REF[name](x, nax, keepdims, w)
            return r

        def scale(b, c):   # sum/mean: error relative to the same reduction of |x| (cancellation)
            w = np.asarray(b[1]) if use_where else None
            with np.errstate(invalid="ignore", divide="ignore"):
                return REDUCE_REF[name](np.abs(to64(b[0])), nax, keepdims, w)

        exact = name in ("max", "min")
        return Config(name, f"x{(B,) + shape} axis={axis} keepdims={keepdims} where={use_where}",
                      dtype, B, batched, single, gen, ref,
                      None if exact else TOL["default"][dtype],
                      scale=scale if name in ("sum", "mean") else None)
    return make


def cfg_arg(name):
    def make(rng, dtype, p):
        d, B = p["dims"], int(rng.choice(p["batch"]))
        rank = int(rng.integers(1, 4))
        shape = _shape(rng, d, rank, p["max_elems"])
        axis = _axis_choice(rng, rank, allow_none=True, allow_tuple=False)
        keepdims = bool(rng.random() < 0.3) and axis is not None
        f = getattr(ops, name)
        npf = np.argmax if name == "argmax" else np.argmin

        if axis is None:
            batched = lambda x: f(x.reshape(x.shape[0], -1), 1)
            single = lambda x: f(x, None)
        else:
            batched = lambda x: f(x, _batched_axis(axis, rank), keepdims)
            single = lambda x: f(x, axis, keepdims)

        def gen(r):
            x = _randn(r, (B,) + shape, dtype)
            if r.random() < 0.3:   # ties: few distinct values
                x = jnp.round(x * 2).astype(dtype)
            return [x], []

        def ref(b, c):
            x = to64(b[0])
            if axis is None:
                return npf(x.reshape(B, -1), axis=1).astype(np.int32)
            ax = _np_axes(axis, rank)[0]
            return npf(x, axis=ax, keepdims=keepdims).astype(np.int32)

        return Config(name, f"x{(B,) + shape} axis={axis} keepdims={keepdims}", dtype, B,
                      batched, single, gen, ref, None)
    return make


def _softmax64(x, axes, where, log):
    if where is not None:
        x = np.where(where, x, -np.inf)
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = np.sum(e, axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = (x - m) - np.log(s) if log else e / s
    if where is not None:
        y = np.where(where, y, -np.inf if log else 0.0)
    return y


def cfg_softmax(name):
    def make(rng, dtype, p):
        B, rank, shape, axis, _, use_where = _reduce_cfg(name, rng, dtype, p, where_ok=True,
                                                         keepdims_ok=False)
        f = getattr(ops, name)
        bax = _batched_axis(axis, rank)
        nax = _np_axes(axis, rank)
        log = name == "log_softmax"

        def gen(r):
            x = _randn(r, (B,) + shape, dtype, float(r.choice([1.0, 0.1, 8.0])))
            if use_where:
                return [x, jnp.asarray(r.random((B,) + shape) < 0.8)], []
            return [x], []

        if use_where:
            batched, single = (lambda x, m: f(x, bax, where=m)), (lambda x, m: f(x, axis, where=m))
        else:
            batched, single = (lambda x: f(x, bax)), (lambda x: f(x, axis))

        def ref(b, c):
            return _softmax64(to64(b[0]), nax, np.asarray(b[1]) if use_where else None, log)

        return Config(name, f"x{(B,) + shape} axis={axis} where={use_where}", dtype, B, batched,
                      single, gen, ref, TOL["default"][dtype])
    return make


def cfg_rms_norm(rng, dtype, p):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    rank = int(rng.integers(1, 3))
    shape = _shape(rng, d, rank, p["max_elems"])
    eps = float(rng.choice([1e-6, 1e-3]))
    offset = float(rng.choice([0.0, 1.0]))

    def gen(r):
        return [_randn(r, (B,) + shape, dtype, float(r.choice([1.0, 0.01, 30.0])))], \
               [_randn(r, shape[-1:], dtype, 0.5)]

    def ref(b, c):
        x, s = to64(b[0]), to64(c[0])
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + s)

    f = lambda x, s: ops.rms_norm(x, s, eps=eps, offset=offset)
    return Config("rms_norm", f"x{(B,) + shape} eps={eps} offset={offset}", dtype, B, f, f, gen,
                  ref, TOL["default"][dtype])


# --- scans ----------------------------------------------------------------------------------------

def _cum64(op, x, axis, reverse):
    if reverse:
        x = np.flip(x, axis)
    if op == "cumsum":
        y = np.cumsum(x, axis=axis)
    elif op == "cumlogsumexp":
        y = np.logaddexp.accumulate(x, axis=axis)
    elif op == "cummax":
        y = np.maximum.accumulate(x, axis=axis)
    else:
        y = np.minimum.accumulate(x, axis=axis)
    return np.flip(y, axis) if reverse else y


def cfg_scan(name):
    def make(rng, dtype, p):
        d, B = p["dims"], int(rng.choice(p["batch"]))
        rank = int(rng.integers(1, 4))
        shape = _shape(rng, d, rank, p["max_elems"])
        axis = int(rng.integers(0, rank))
        axis = axis - rank if rng.random() < 0.5 else axis
        reverse = bool(rng.random() < 0.5)
        f = getattr(ops, name)
        bax = axis + 1 if axis >= 0 else axis

        def gen(r):
            return [_randn(r, (B,) + shape, dtype)], []

        def ref(b, c):
            return _cum64(name, to64(b[0]), bax % (rank + 1), reverse)

        exact = name in ("cummax", "cummin")
        return Config(name, f"x{(B,) + shape} axis={axis} reverse={reverse}", dtype, B,
                      lambda x: f(x, bax, reverse), lambda x: f(x, axis, reverse), gen, ref,
                      None if exact else TOL["default"][dtype])
    return make


# --- attention ------------------------------------------------------------------------------------

def attention64(q, k, v, *, causal, sliding_window, soft_cap, scale, q_pos, kv_len):
    """Independent float64 restatement of the documented semantics (detjax/ops/_attention.py)."""
    q, k, v = to64(q), to64(k), to64(v)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
    qp = np.asarray(q_pos)[:, None, :, None]
    kp = np.arange(s)[None, None, None, :]
    valid = kp < np.asarray(kv_len)[:, None, None, None]
    if causal:
        valid = valid & (kp <= qp)
        if sliding_window is not None:
            valid = valid & (qp - sliding_window < kp)
    elif sliding_window is not None:
        valid = valid & (np.abs(qp - kp) < sliding_window)
    logits = np.where(valid, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    pr = np.where(valid, np.exp(logits - m), 0.0)
    den = pr.sum(-1, keepdims=True)
    pr = pr / np.where(den == 0, 1.0, den)
    return np.einsum("bnts,bsnh->btnh", pr, v)


_HEADS = ((1, 1), (2, 1), (4, 2), (3, 3), (8, 1))


def _attn_opts(rng):
    return dict(causal=bool(rng.random() < 0.75),
                sliding_window=rng.choice([None, None, 1, 3, 16]),
                logits_soft_cap=rng.choice([None, None, 5.0]),
                scale=rng.choice([None, None, 0.3]))


def cfg_attention(rng, dtype, p):
    B = int(rng.choice(p["batch"]))
    S = int(rng.choice([s for s in (1, 5, 13, 64, 70, 130) if s <= max(p["dims"])] or [5]))
    T = S if rng.random() < 0.5 else int(rng.choice([t for t in (1, 3, 7) if t <= S] or [1]))
    N, K = _HEADS[int(rng.integers(len(_HEADS)))]
    H = int(rng.choice([8, 16, 32, 64, 24]))
    o = _attn_opts(rng)
    o = {k: (None if v is None else (int(v) if k == "sliding_window" else float(v)) if k != "causal" else v)
         for k, v in o.items()}
    use_qpos, use_kvl = bool(rng.random() < 0.3), bool(rng.random() < 0.5)

    def gen(r):
        q = _randn(r, (B, T, N, H), dtype)
        k, v = _randn(r, (B, S, K, H), dtype), _randn(r, (B, S, K, H), dtype)
        args = [q, k, v]
        if use_qpos:
            args.append(jnp.asarray(np.sort(r.integers(0, S, (B, T)), axis=1), jnp.int32))
        if use_kvl:
            args.append(jnp.asarray(r.integers(0, S + 1, (B,)), jnp.int32))
        return args, []

    def call(q, k, v, *rest):
        rest = list(rest)
        qp = rest.pop(0) if use_qpos else None
        kvl = rest.pop(0) if use_kvl else None
        return ops.attention(q, k, v, q_positions=qp, kv_lengths=kvl, **o)

    def single(q, k, v, *rest):
        rest = [r[None] for r in rest]
        return call(q[None], k[None], v[None], *rest)[0]

    def ref(b, c):
        q, k, v, *rest = b
        qp = np.asarray(rest.pop(0)) if use_qpos else np.broadcast_to(np.arange(T) + S - T, (B, T))
        kvl = np.asarray(rest.pop(0)) if use_kvl else np.full((B,), S)
        return attention64(q, k, v, causal=o["causal"], sliding_window=o["sliding_window"],
                           soft_cap=o["logits_soft_cap"], scale=o["scale"], q_pos=qp, kv_len=kvl)

    return Config("attention", f"q{(B, T, N, H)} kv{(B, S, K, H)} {o} qpos={use_qpos} kvl={use_kvl}",
                  dtype, B, call, single, gen, ref, TOL["attention"][dtype])


def cfg_decode_attention(rng, dtype, p):
    B = int(rng.choice(p["batch"]))
    L = int(rng.choice([8, 64, 70, 130]))
    Tq = int(rng.choice([1, 1, 2, 3]))
    N, K = _HEADS[int(rng.integers(len(_HEADS)))]
    H = int(rng.choice([8, 16, 32, 64, 24]))
    o = _attn_opts(rng)
    o = {k: (None if v is None else (int(v) if k == "sliding_window" else float(v)) if k != "causal" else v)
         for k, v in o.items()}

    def gen(r):
        q = _randn(r, (B, Tq, N, H), dtype)
        kc, vc = _randn(r, (B, L, K, H), dtype), _randn(r, (B, L, K, H), dtype)
        lengths = jnp.asarray(r.integers(0, L + 1, (B,)), jnp.int32)
        return [q, kc, vc, lengths], []

    def call(q, kc, vc, lengths):
        return ops.decode_attention(q, kc, vc, lengths, **o)

    def single(q, kc, vc, lengths):
        return call(q[None], kc[None], vc[None], lengths[None])[0]

    def as_prefill(q, kc, vc, lengths):
        qp = lengths[:, None] - Tq + jnp.arange(Tq, dtype=jnp.int32)[None, :]
        return ops.attention(q, kc, vc, q_positions=qp, kv_lengths=lengths, **o)

    def ref(b, c):
        q, kc, vc, lengths = b
        ln = np.asarray(lengths)
        qp = ln[:, None] - Tq + np.arange(Tq)[None, :]
        return attention64(q, kc, vc, causal=o["causal"], sliding_window=o["sliding_window"],
                           soft_cap=o["logits_soft_cap"], scale=o["scale"], q_pos=qp, kv_len=ln)

    return Config("decode_attention", f"q{(B, Tq, N, H)} cache{(B, L, K, H)} {o}", dtype, B, call,
                  single, gen, ref, TOL["attention"][dtype], extra=as_prefill)


# --- detjax.deterministic on jnp functions --------------------------------------------------------

def _np_layernorm(x):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5)


DET_FUNCS = {
    "softmax(x@w).sum": (lambda x, w: jax.nn.softmax(x @ w, axis=-1).sum(-1),
                         lambda x, w: (lambda z: (np.exp(z - z.max(-1, keepdims=True)) /
                                                  np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)).sum(-1))(x @ w)),
    "mean": (lambda x, w: jnp.mean(x, axis=-1), lambda x, w: x.mean(-1)),
    "logsumexp": (lambda x, w: jax.nn.logsumexp(x, axis=-1),
                  lambda x, w: _lse64(x, (x.ndim - 1,), False, None)),
    "norm": (lambda x, w: jnp.linalg.norm(x, axis=-1), lambda x, w: np.linalg.norm(x, axis=-1)),
    "cumsum": (lambda x, w: jnp.cumsum(x, axis=-1), lambda x, w: np.cumsum(x, axis=-1)),
    "layernorm": (lambda x, w: (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5),
                  lambda x, w: _np_layernorm(x)),
    "max(x@w)": (lambda x, w: jnp.max(x @ w, axis=-1), lambda x, w: (x @ w).max(-1)),
}


def cfg_deterministic(rng, dtype, p):
    d, B = p["dims"], int(rng.choice(p["batch"]))
    name = list(DET_FUNCS)[int(rng.integers(len(DET_FUNCS)))]
    fn, fn64 = DET_FUNCS[name]
    D, E = _shape(rng, d, 2, p["max_elems"] * 4)
    det = detjax.deterministic(fn)

    def gen(r):
        return [_randn(r, (B, D), dtype)], [_randn(r, (D, E), dtype, 1 / math.sqrt(D))]

    tol = TOL["deterministic"][dtype]
    if name == "max(x@w)":
        tol = TOL["matmul"][dtype] if dtype != F32 else 2e-6
    return Config("deterministic", f"{name} x{(B, D)} w{(D, E)}", dtype, B, det, det, gen,
                  lambda b, c: fn64(to64(b[0]), to64(c[0])), tol)


ISO_FUNCS = {"tanh": (jnp.tanh, np.tanh), "exp": (jnp.exp, np.exp), "sin": (jnp.sin, np.sin),
             "gelu": (lambda v: jax.nn.gelu(v, approximate=True),
                      lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))))}


def cfg_isolated(rng, dtype, p):
    """``isolated(fn, .)`` between two detjax matmuls: the case where XLA's fusion changed bits."""
    d, B = p["dims"], int(rng.choice(p["batch"]))
    name = list(ISO_FUNCS)[int(rng.integers(len(ISO_FUNCS)))]
    fn, fn64 = ISO_FUNCS[name]
    D, E = _shape(rng, d, 2, p["max_elems"] * 4)

    def f(x, w):
        return ops.matmul(ops.isolated(fn, ops.matmul(x, w)), w.T)

    def gen(r):
        return [_randn(r, (B, D), dtype)], [_randn(r, (D, E), dtype, 1 / math.sqrt(D))]

    def ref(b, c):
        x, w = to64(b[0]), to64(c[0])
        return fn64(x @ w) @ w.T

    return Config("isolated", f"matmul(isolated({name}, x@w), w.T) x{(B, D)} w{(D, E)}", dtype, B,
                  f, f, gen, ref, TOL["deterministic"][dtype])


def cfg_embedding_lookup(rng, dtype, p):
    """Rows of a table: exact, so the reference is the float64 gather itself (tolerance 0)."""
    B = int(rng.choice(p["batch"]))
    V = int(rng.choice([1, 7, 64, 130, 1031]))
    D = int(rng.choice([1, 3, 16, 130]))
    T = int(rng.choice([1, 5, 33]))

    def gen(r):
        ids = r.integers(-V, V, size=(B, T))
        ids[:, : max(1, T // 3)] = ids[:, :1]                     # repeated ids
        return [jnp.asarray(ids, jnp.int32)], [_randn(r, (V, D), dtype)]

    def f(ids, table):
        return ops.embedding_lookup(table, ids)

    def ref(b, c):
        ids, table = np.asarray(b[0]), to64(c[0])
        return table[np.where(ids < 0, ids + V, ids)]

    return Config("embedding_lookup", f"table{(V, D)} ids{(B, T)}", dtype, B, f, f, gen, ref, None)


OPS: dict[str, Callable] = {
    "matmul": cfg_matmul, "dot_general": cfg_dot_general, "einsum": cfg_einsum,
    **{n: cfg_reduce(n) for n in ("sum", "mean", "max", "min", "logsumexp")},
    "argmax": cfg_arg("argmax"), "argmin": cfg_arg("argmin"),
    "softmax": cfg_softmax("softmax"), "log_softmax": cfg_softmax("log_softmax"),
    "rms_norm": cfg_rms_norm,
    **{n: cfg_scan(n) for n in ("cumsum", "cumlogsumexp", "cummax", "cummin")},
    "attention": cfg_attention, "decode_attention": cfg_decode_attention,
    "deterministic": cfg_deterministic, "isolated": cfg_isolated,
    "embedding_lookup": cfg_embedding_lookup,
}
#: Public ops with no fuzz configuration yet (reported in fuzz.md / fuzz.json, not fatal).
UNCOVERED = sorted(set(ops.__all__) - set(OPS))


# ---------------------------------------------------------------------------------------------
# Running one case

@dataclasses.dataclass
class OpStats:
    op: str
    cases: int = 0
    configs: int = 0
    checks: dict = dataclasses.field(default_factory=lambda: {c: 0 for c in CHECKS})
    mismatches: dict = dataclasses.field(default_factory=lambda: {c: 0 for c in CHECKS})
    dtypes: dict = dataclasses.field(default_factory=dict)
    worst_ratio: float = 0.0           # max over cases of rel_err / tol
    ratios: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def total_mismatches(self):
        return int(sum(self.mismatches.values()))

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["total_mismatches"] = self.total_mismatches
        d["ratios"] = [round(r, 4) for r in self.ratios]
        return d


def _rows(out, i):
    return jax.tree.map(lambda a: np.asarray(a)[i], out)


def _tree_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(bitwise_equal(x, y) for x, y in zip(la, lb))


def run_case(cfg: Config, stats: OpStats, data_seed: int, positions, neighbour_pos: int):
    """One fuzz case; records into ``stats``. Never raises."""
    r = np.random.default_rng(data_seed)
    stats.cases += 1
    stats.dtypes[DNAME[cfg.dtype]] = stats.dtypes.get(DNAME[cfg.dtype], 0) + 1
    B = cfg.batch

    def fail(check, detail):
        stats.mismatches[check] += 1
        if len(stats.failures) < 20:
            stats.failures.append(dict(check=check, config=cfg.desc, dtype=DNAME[cfg.dtype],
                                       data_seed=data_seed, positions=list(positions),
                                       detail=str(detail)[:400]))

    try:
        bargs, cargs = cfg.gen(r)
        full_f = cfg.jitted("batched")
        out = jax.block_until_ready(full_f(*bargs, *cargs))
        # run-to-run
        stats.checks["run"] += 1
        out2 = full_f(*bargs, *cargs)
        if not _tree_bitwise(out, out2):
            fail("run", "second call differs bitwise")
        # row alone vs in batch
        for i in positions:
            stats.checks["batch"] += 1
            alone = full_f(*[a[i:i + 1] for a in bargs], *cargs)
            if not _tree_bitwise(_rows(alone, 0), _rows(out, i)):
                fail("batch", f"row {i} of batch {B} differs from the row alone")
        # same row, other neighbours, other position
        i = positions[0]
        j = neighbour_pos
        nb_args, _ = cfg.gen(np.random.default_rng(data_seed ^ 0x5EED))
        moved = [jnp.asarray(n).at[j].set(a[i]) for n, a in zip(nb_args, bargs)]
        stats.checks["neigh"] += 1
        outn = full_f(*moved, *cargs)
        if not _tree_bitwise(_rows(outn, j), _rows(out, i)):
            fail("neigh", f"row {i} moved to {j} among new neighbours differs")
        # vmap
        stats.checks["vmap"] += 1
        outv = cfg.jitted("vmap")(*bargs, *cargs)
        if not _tree_bitwise(outv, out):
            fail("vmap", "jax.vmap of the per-example function differs from the batched call")
        # decode = prefill
        if cfg.extra is not None:
            stats.checks["decode=prefill"] += 1
            oute = cfg.jitted("extra")(*bargs, *cargs)
            if not _tree_bitwise(oute, out):
                fail("decode=prefill", "decode_attention differs from attention on the same rows")
        # accuracy
        stats.checks["acc"] += 1
        ref = cfg.ref(bargs, cargs)
        if cfg.tol is None:
            o, rf = np.asarray(out), np.asarray(ref)
            ok = o.shape == rf.shape and np.array_equal(to64(o), rf.astype(np.float64), equal_nan=True)
            if not ok:
                fail("acc", f"not exact: shapes {o.shape} vs {rf.shape}; "
                            f"{int(np.sum(to64(o) != rf)) if o.shape == rf.shape else '-'} differ")
        else:
            err = rel_frobenius(out, ref, None if cfg.scale is None else cfg.scale(bargs, cargs))
            ratio = err / cfg.tol
            stats.ratios.append(ratio if math.isfinite(ratio) else 1e9)
            stats.worst_ratio = max(stats.worst_ratio, ratio if math.isfinite(ratio) else 1e9)
            if not err <= cfg.tol:
                fail("acc", f"relative error {err:.3g} > tolerance {cfg.tol:g}")
    except Exception as e:  # noqa: BLE001 - a crash on valid input is a finding
        stats.checks["error"] += 1
        fail("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# ---------------------------------------------------------------------------------------------
# Fuzzing with hypothesis

def _config_dtypes(op: str, n: int):
    """n dtypes for n configurations: all three cycled, starting at an op-dependent offset."""
    start = stable_hash(op) % 3
    return [DTYPES[(start + k) % 3] for k in range(n)]


def build_pool(op: str, profile: str, seed: int, n_configs: int | None = None):
    p = PROFILES[profile]
    n = n_configs or p["configs"]
    rng = np.random.default_rng([seed, stable_hash(op)])
    pool = []
    for dt in _config_dtypes(op, n):
        for _ in range(20):   # avoid duplicate descriptions
            c = OPS[op](rng, dt, p)
            if all(c.desc != o.desc or c.dtype != o.dtype for o in pool):
                break
        pool.append(c)
    return pool


def fuzz_op(op: str, profile: str = "ci", seed: int | None = None, cases: int | None = None,
            n_configs: int | None = None, time_limit: float | None = None,
            verbose: bool = False) -> OpStats:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    p = PROFILES[profile]
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    cases = p["cases"] if cases is None else cases
    time_limit = p["op_time_limit"] if time_limit is None else time_limit
    pool = build_pool(op, profile, seed, n_configs)
    stats = OpStats(op, configs=len(pool))
    t0 = time.perf_counter()

    @settings(max_examples=cases, deadline=None, derandomize=False, database=None,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.data())
    def body(data):
        # Draw first, then check the clock: a case that stops drawing early when the time limit
        # hits makes hypothesis report its strategy as flaky.
        cfg = data.draw(st.sampled_from(pool), label="config")
        B = cfg.batch
        data_seed = data.draw(st.integers(0, 2**32 - 1), label="data_seed")
        positions = data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=2, unique=True),
                              label="rows")
        j = data.draw(st.integers(0, B - 1), label="neighbour_pos")
        if time.perf_counter() - t0 > time_limit:
            stats.stopped_early = True
            return
        run_case(cfg, stats, data_seed, positions, j)

    body()
    stats.seconds = time.perf_counter() - t0
    if verbose:
        print(f"  {op:17s} {stats.cases:5d} cases {stats.configs} configs "
              f"{stats.total_mismatches:3d} mismatches {stats.seconds:6.1f}s", flush=True)
        for f_ in stats.failures:   # printed at once: a run cut off later still shows its cases
            print(f"    MISMATCH {f_}", flush=True)
    stats.seed = seed  # type: ignore[attr-defined]
    stats.pool = [dict(config=c.desc, dtype=DNAME[c.dtype]) for c in pool]  # type: ignore
    return stats


def fuzz_all(profile: str, seed: int | None = None, only_ops=None, verbose=True) -> dict:
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    res = {}
    for op in OPS:
        if only_ops and op not in only_ops:
            continue
        st_ = fuzz_op(op, profile, seed, verbose=verbose)
        res[op] = st_
    if UNCOVERED and verbose:
        print(f"  NOTE: public ops with no fuzz configuration: {UNCOVERED}", flush=True)
    return dict(seed=seed, stats=res, uncovered=UNCOVERED)


# ---------------------------------------------------------------------------------------------
# Stress

_NEEDLE = [17, 3, 250, 9, 41, 77, 5]


def stress(forwards: int, generations: int, threads: int, batch_sizes=(1, 2, 3, 4),
           max_new_tokens: int = 6, seed: int = 0, verbose=True, time_limit: float = 1e9) -> dict:
    """One distinct output hash, whatever the repetition, batch or thread. Each of the four
    phases stops early (and says so: ``calls``) past ``time_limit / 4`` seconds."""
    phase_limit = time_limit / 4
    from flax import nnx
    from detjax.models.gemma import GemmaConfig, Transformer

    model = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    toks = jnp.asarray((np.arange(16) * 7 + 3) % model.config.vocab_size, jnp.int32).reshape(2, 8)
    out = {}

    def forward_hashes(n, t_start):
        out_ = []
        for _ in range(n):
            if time.perf_counter() - t_start > phase_limit:
                break
            out_.append(sha(fwd(state, toks)))
        return out_

    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, toks))
    hs = forward_hashes(forwards, t0)
    out["forward_serial"] = dict(calls=len(hs), distinct=len(set(hs)), seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    per = max(1, forwards // threads)
    with cf.ThreadPoolExecutor(threads) as ex:
        th = [h for f in [ex.submit(forward_hashes, per, t0) for _ in range(threads)] for h in f.result()]
    out["forward_threads"] = dict(calls=len(th), threads=threads, distinct=len(set(th) | set(hs)),
                                  seconds=time.perf_counter() - t0)
    if verbose:
        print(f"  forward: {forwards} serial + {len(th)} in {threads} threads -> "
              f"{out['forward_threads']['distinct']} distinct hash(es)", flush=True)

    vocab = model.config.vocab_size
    # Precompute the batches: the needle among neighbours no longer than it (so the padded prompt
    # length, hence the compiled program, only depends on the batch size), shuffled.
    rng = np.random.default_rng(seed)
    batches = []
    for g in range(generations):
        bsz = int(batch_sizes[g % len(batch_sizes)])
        others = [list(map(int, rng.integers(0, vocab, int(rng.integers(1, len(_NEEDLE) + 1)))))
                  for _ in range(bsz - 1)]
        pos = int(rng.integers(0, bsz))
        prompts = others[:pos] + [_NEEDLE] + others[pos:]
        ids = [1000 + int(x) for x in rng.permutation(bsz)]
        ids[pos] = 7
        temp = 0.0 if g % 2 == 0 else 0.8
        batches.append((prompts, pos, ids, temp))

    def gen_hashes(items, t_start):
        hs = {0.0: [], 0.8: []}
        for prompts, pos, ids, temp in items:
            if time.perf_counter() - t_start > phase_limit:
                break
            r = detjax.generate(model, prompts, max_new_tokens, temperature=temp, seed=seed,
                                sequence_ids=ids)
            hs[temp].append(sha(r.tokens[pos], r.logprobs[pos]))
        return hs

    t0 = time.perf_counter()
    g1 = gen_hashes(batches, t0)
    out["generate_serial"] = dict(calls=len(g1[0.0]) + len(g1[0.8]), batch_sizes=list(batch_sizes),
                                  distinct_greedy=len(set(g1[0.0])),
                                  distinct_sampled=len(set(g1[0.8])),
                                  seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    shuffled = list(batches)
    random.Random(seed + 1).shuffle(shuffled)
    chunks = [shuffled[k::threads] for k in range(threads)]
    with cf.ThreadPoolExecutor(threads) as ex:
        res = [f.result() for f in [ex.submit(gen_hashes, c, t0) for c in chunks if c]]
    gt = {t: [h for r_ in res for h in r_[t]] for t in (0.0, 0.8)}
    out["generate_threads"] = dict(calls=len(gt[0.0]) + len(gt[0.8]), threads=threads,
                                   distinct_greedy=len(set(gt[0.0]) | set(g1[0.0])),
                                   distinct_sampled=len(set(gt[0.8]) | set(g1[0.8])),
                                   seconds=time.perf_counter() - t0)
    if verbose:
        print(f"  generate: {len(batches)} serial + {out['generate_threads']['calls']} in {threads} "
              f"threads -> greedy {out['generate_threads']['distinct_greedy']}, sampled "
              f"{out['generate_threads']['distinct_sampled']} distinct hash(es)", flush=True)
    out["ok"] = (out["forward_threads"]["distinct"] == 1 and
                 out["generate_threads"]["distinct_greedy"] == 1 and
                 out["generate_threads"]["distinct_sampled"] <= 1)
    return out


# ---------------------------------------------------------------------------------------------
# Reports

def environment() -> dict:
    return dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                platform=jax.default_backend(), detjax_backend=detjax.chosen_backend(),
                python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def fuzz_markdown(fz: dict, profile: str, env: dict) -> str:
    lines = [f"# detjax fuzzing ({profile} profile)", "",
             f"device `{env['device']}`, detjax backend `{env['detjax_backend']}`, jax {env['jax']}, "
             f"pool seed {fz['seed']}, {env['date']}", "",
             "Every case checks bitwise: run-to-run, row alone vs in batch, same row among other "
             "neighbours at another position, `jax.vmap`; and accuracy vs float64 "
             "(`acc`; worst = largest error / tolerance).", "",
             "| op | configs | cases | bf16/f16/f32 | run | batch | neigh | vmap | acc | other | "
             "errors | mismatches | worst err/tol | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tot_c = tot_m = 0
    for op, s in fz["stats"].items():
        m = s.mismatches
        dt = "/".join(str(s.dtypes.get(k, 0)) for k in ("bf16", "f16", "f32"))

        def cell(c):
            return f"{m[c]}/{s.checks[c]}" if s.checks[c] else "-"
        lines.append(f"| {op} | {s.configs} | {s.cases}{'*' if s.stopped_early else ''} | {dt} | "
                     f"{cell('run')} | {cell('batch')} | {cell('neigh')} | {cell('vmap')} | "
                     f"{cell('acc')} | {cell('decode=prefill')} | {m['error']} | "
                     f"**{s.total_mismatches}** | {s.worst_ratio:.2f} | {s.seconds:.0f} |")
        tot_c += s.cases
        tot_m += s.total_mismatches
    if fz.get("uncovered"):
        lines += ["", f"Public ops not fuzzed yet (no configuration): {', '.join(fz['uncovered'])}."]
    lines += ["", f"Total: {tot_c} cases, {tot_m} mismatches. Cells: mismatches/checks. "
              "`other` = decode=prefill (decode_attention vs attention). `*` = stopped at the "
              "per-op time limit.", ""]
    fails = [(op, f) for op, s in fz["stats"].items() for f in s.failures]
    if fails:
        lines += ["## Failures (first 20 per op)", "", "| op | check | dtype | config | detail |",
                  "|---|---|---|---|---|"]
        for op, f in fails:
            lines.append(f"| {op} | {f['check']} | {f['dtype']} | `{f['config']}` | "
                         f"{f['detail'].replace('|', '/')} (data_seed {f['data_seed']}) |")
    lines += ["", "## Configurations", ""]
    for op, s in fz["stats"].items():
        lines.append(f"- **{op}**: " + "; ".join(f"{c['dtype']} `{c['config']}`" for c in s.pool))
    return "\n".join(lines) + "\n"


def figures(fz: dict, out: Path, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = list(fz["stats"])
    st_ = [fz["stats"][n] for n in names]
    files = []
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(names))
    ax.bar(x, [s.cases for s in st_], color="tab:blue", label="cases")
    ax.bar(x, [s.total_mismatches for s in st_], color="tab:red", label="mismatches")
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("count")
    ax.set_title(f"detjax fuzzing: cases and mismatches per op ({title})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fuzz_cases.png", dpi=110)
    plt.close(fig)
    files.append("fuzz_cases.png")
    fig, ax = plt.subplots(figsize=(10, 4))
    data = [np.clip(np.asarray(s.ratios) if s.ratios else np.zeros(1), 1e-6, None) for s in st_]
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks(x + 1, names, rotation=60, ha="right")
    ax.set_yscale("log")
    ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="tolerance")
    ax.set_ylabel("relative Frobenius error / tolerance")
    ax.set_title(f"accuracy vs float64 ({title}; exact ops omitted: max/min/arg*/cummax/cummin)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fuzz_error_ratio.png", dpi=110)
    plt.close(fig)
    files.append("fuzz_error_ratio.png")
    return files


def summary_table(fz: dict | None, stress_res: dict | None) -> str:
    lines = []
    if fz:
        lines.append(f"{'op':17s} {'cases':>6s} {'mismatch':>8s} {'errors':>6s} {'worst':>6s} {'s':>6s}")
        for op, s in fz["stats"].items():
            lines.append(f"{op:17s} {s.cases:6d} {s.total_mismatches:8d} {s.mismatches['error']:6d} "
                         f"{s.worst_ratio:6.2f} {s.seconds:6.1f}")
        tc = sum(s.cases for s in fz["stats"].values())
        tm = sum(s.total_mismatches for s in fz["stats"].values())
        lines.append(f"{'TOTAL':17s} {tc:6d} {tm:8d}")
    if stress_res:
        ft, gt = stress_res["forward_threads"], stress_res["generate_threads"]
        fs, gs = stress_res["forward_serial"], stress_res["generate_serial"]
        lines.append(f"stress forward : {fs['calls']} serial + {ft['calls']} x{ft['threads']} threads "
                     f"-> {ft['distinct']} distinct hash")
        lines.append(f"stress generate: {gs['calls']} serial + {gt['calls']} x{gt['threads']} threads "
                     f"-> greedy {gt['distinct_greedy']}, sampled {gt['distinct_sampled']} distinct")
        lines.append(f"stress ok: {stress_res['ok']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The bad-input table (shared with tests/test_bad_input.py)

# Each entry: a public function or CLI command, an invalid (or IEEE-special) input, and what must
# happen: a clear error (type + a pattern naming the argument), or the documented IEEE result.
# ``defect`` marks a known defect in a module this file does not own: the test is
# xfail(strict=True), so it flips when the module is fixed.

@dataclasses.dataclass
class BadInput:
    function: str
    case: str
    thunk: Callable
    raises: tuple | None = None        # (exception types, regex the message must match)
    returns: Callable | None = None    # result -> bool (the documented IEEE / empty result)
    expected: str = ""                 # the documented result, in words (for `returns`)
    defect: str | None = None

    @property
    def id(self):
        return f"{self.function}: {self.case}"


class _WouldAllocate(Exception):
    """Raised by the patched allocation point: the input was not rejected before allocating."""


def _x(shape=(3, 4), dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _arr(vals, dtype=jnp.float32):
    return jnp.asarray(np.asarray(vals, np.float64), dtype)


def _same_bits(a, b):
    return bitwise_equal(np.asarray(a), np.asarray(b))


def _eq_nan(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


_Q = lambda b=1, t=3, n=2, h=8, dt=jnp.float32: _x((b, t, n, h), dt, 1)  # noqa: E731
_KV = lambda b=1, s=3, k=1, h=8, dt=jnp.float32: _x((b, s, k, h), dt, 2)  # noqa: E731


def _model():
    if not hasattr(_model, "m"):
        from flax import nnx
        from detjax.models.gemma import GemmaConfig, Transformer
        _model.m = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
    return _model.m


def _generate_no_alloc(**kw):
    """generate(model, ...) with the compiled program (which allocates the KV cache) replaced by a
    sentinel: a huge request must be rejected before it is reached."""
    g = sys.modules["detjax.generate"]
    orig = g._generate_jit

    def sentinel(*a, **k):
        raise _WouldAllocate(f"reached the compiled program (KV cache allocation) with "
                             f"max_len={k.get('max_len')}, max_new_tokens={k.get('max_new_tokens')}")
    g._generate_jit = sentinel
    try:
        return g.generate(_model(), **kw)
    finally:
        g._generate_jit = orig


def _gen(**kw):
    kw.setdefault("prompts", [[1, 2, 3]])
    kw.setdefault("max_new_tokens", 2)
    return _generate_no_alloc(**kw)


def _cli(*argv):
    """Run the CLI in-process; returns (exit status, stderr). Never runs a real generation."""
    import contextlib
    import io
    from detjax import cli
    g = sys.modules["detjax.generate"]
    orig = g._generate_jit

    def sentinel(*a, **k):
        raise _WouldAllocate(f"reached generation with max_len={k.get('max_len')}")
    g._generate_jit = sentinel
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli.main(list(argv))
            except SystemExit as e:
                rc = e.code
    finally:
        g._generate_jit = orig
    return rc, err.getvalue()


def _cli_expect(rc_want, pattern):
    import re

    def check(res):
        rc, err = res
        return rc == rc_want and re.search(pattern, err, re.S) is not None and "Traceback" not in err
    return check


# --- checkpoints --------------------------------------------------------------------------------

_TMP_DIRS: list = []


def _tmpdir():
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="detjax-rel-ck-")
    if not _TMP_DIRS:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _TMP_DIRS])
    _TMP_DIRS.append(d)
    return d


def _saved_ckpt():
    if not hasattr(_saved_ckpt, "path"):
        from detjax import checkpoint as ck
        d = _tmpdir()
        _saved_ckpt.path = ck.save(os.path.join(d, "model"), _model())
    return _saved_ckpt.path


def _ckpt_copy():
    import shutil
    dst = os.path.join(_tmpdir(), "copy")
    shutil.copytree(_saved_ckpt(), dst)
    return dst


def _ckpt_data_files(p):
    out = []
    for root, _, files in os.walk(os.path.join(p, "state")):
        if os.path.basename(root) == "d":
            out += [os.path.join(root, f) for f in files]
    return sorted(out, key=os.path.getsize)


def _ckpt_flip_bytes():
    """Flip 16 bytes in the middle of every orbax data file. Restore must fail with a
    CheckpointError or (if the bytes were unused) return the exact original parameters."""
    from detjax import checkpoint as ck
    p = _ckpt_copy()
    files = _ckpt_data_files(p)
    assert files, "no orbax data files found"
    for f in files:
        data = bytearray(open(f, "rb").read())
        mid = len(data) // 2
        for k in range(mid, min(mid + 16, len(data))):
            data[k] ^= 0xFF
        open(f, "wb").write(bytes(data))
    try:
        m = ck.restore(p)
    except ck.CheckpointError as e:
        return ("CheckpointError", str(e))
    return ("restored", ck.param_hashes(m) == ck.param_hashes(_model()))


def _ckpt_edit_json(name, edit):
    import json as _json
    p = _ckpt_copy()
    f = os.path.join(p, name)
    obj = _json.load(open(f))
    edit(obj)
    _json.dump(obj, open(f, "w"))
    return p


def _foreign_backend():
    """A backend other than the one running now (so the fingerprint is from elsewhere)."""
    import detjax
    return "tpu" if detjax.chosen_backend() == "gpu" else "gpu"


def _ckpt_other_backend():
    """A fingerprint recorded on another backend (other device kind, other logits hash): restore
    must warn (CheckpointEnvironmentWarning naming the backend), not fail, and return the model."""
    import warnings
    from detjax import checkpoint as ck

    def edit(fp):
        fp["environment"]["backend"] = _foreign_backend()
        fp["environment"]["device_kind"] = "another device"
        fp["logits_sha256"] = "ab" * 32
    p = _ckpt_edit_json("fingerprint.json", edit)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = ck.restore(p)
    msgs = [str(x.message) for x in w if issubclass(x.category, ck.CheckpointEnvironmentWarning)]
    return bool(msgs) and "backend" in msgs[0] and f"'{_foreign_backend()}'" in msgs[0] and \
        ck.param_hashes(m) == ck.param_hashes(_model())


def _ckpt_same_env_other_hash():
    from detjax import checkpoint as ck
    p = _ckpt_edit_json("fingerprint.json", lambda fp: fp.__setitem__("logits_sha256", "0" * 64))
    return ck.restore(p)


def _ckpt_restore_edit(name, edit):
    from detjax import checkpoint as ck
    return ck.restore(_ckpt_edit_json(name, edit))


def _tiny_config_eval_shape(**kw):
    """nnx.eval_shape: builds nothing, so a huge config can be checked without allocating."""
    from flax import nnx
    from detjax.models.gemma import GemmaConfig, Transformer
    return nnx.eval_shape(lambda: Transformer(GemmaConfig.tiny(**kw), rngs=nnx.Rngs(0)))


def _build_bad_inputs():
    from detjax import checkpoint as ck
    from detjax.transform import NondeterministicOpError
    TE, VE = TypeError, ValueError
    x = _x()
    w = _x((4, 5))
    E = []

    def add(fn, case, thunk, raises=None, returns=None, expected="", defect=None):
        E.append(BadInput(fn, case, thunk, raises, returns, expected, defect))

    # ---- matmul / dot_general / einsum
    add("matmul", "a is a scalar", lambda: ops.matmul(jnp.float32(1), w), (VE, r"rank >= 1"))
    add("matmul", "a has an integer dtype", lambda: ops.matmul(jnp.ones((3, 4), jnp.int32), w),
        (TE, r"\ba\b.*floating"))
    add("matmul", "b is complex", lambda: ops.matmul(x, w.astype(jnp.complex64)), (TE, r"\bb\b.*floating"))
    add("matmul", "contracting sizes differ", lambda: ops.matmul(x, _x((5, 5))),
        (VE, r"contracting dims do not match.*\(3, 4\).*\(5, 5\)"))
    add("matmul", "a is a string", lambda: ops.matmul("abc", w), (TE, r"\ba\b|string|str"))
    add("matmul", "precision='fast'", lambda: ops.matmul(x, w, precision="fast"), (VE, r"precision"))
    add("matmul", "preferred_element_type=int32",
        lambda: ops.matmul(x, w, preferred_element_type=jnp.int32), (TE, r"preferred_element_type"))
    add("matmul", "backend='cuda9'", lambda: ops.matmul(x, w, backend="cuda9"), (VE, r"backend"))
    add("matmul", "empty rows M=0", lambda: ops.matmul(jnp.zeros((0, 4)), w),
        returns=lambda r: r.shape == (0, 5), expected="an empty (0, 5) result")
    add("matmul", "empty contraction K=0", lambda: ops.matmul(jnp.zeros((2, 0)), jnp.zeros((0, 3))),
        returns=lambda r: r.shape == (2, 3) and np.all(np.asarray(r) == 0),
        expected="zeros (an empty sum is 0), like jnp.matmul")
    add("matmul", "NaN in row 0", lambda: ops.matmul(x.at[0, 1].set(jnp.nan), w),
        returns=lambda r: bool(np.all(np.isnan(r[0]))) and bool(np.all(np.isfinite(r[1:]))),
        expected="row 0 all NaN, other rows finite (NaN never leaks across rows)")
    add("matmul", "inf * 0", lambda: ops.matmul(_arr([[jnp.inf, 0.0]]), _arr([[0.0], [1.0]])),
        returns=lambda r: bool(np.isnan(r[0, 0])), expected="NaN (inf*0 = NaN, IEEE)")
    add("matmul", "+inf + -inf", lambda: ops.matmul(_arr([[jnp.inf, 1.0]]), _arr([[1.0], [-jnp.inf]])),
        returns=lambda r: bool(np.isnan(r[0, 0])), expected="NaN (inf - inf)")
    add("matmul", "f16 overflow", lambda: ops.matmul(jnp.full((1, 4), 300.0, jnp.float16),
                                                     jnp.full((4, 1), 300.0, jnp.float16)),
        returns=lambda r: bool(np.isposinf(np.asarray(r, np.float32)[0, 0])),
        expected="+inf (360000 overflows float16; accumulation is f32, the output rounds to inf)")
    add("dot_general", "dimension_numbers not nested", lambda: ops.dot_general(x, w, (1, 0)),
        (VE, r"dimension_numbers"))
    add("dot_general", "contracting dim out of range",
        lambda: ops.dot_general(x, w, (((5,), (0,)), ((), ()))), (VE, r"out of range"))
    add("dot_general", "contracting sizes differ",
        lambda: ops.dot_general(x, w, (((0,), (0,)), ((), ()))), (VE, r"contracting dims do not match"))
    add("dot_general", "batch sizes differ",
        lambda: ops.dot_general(_x((2, 3, 4)), _x((3, 4, 5)), (((2,), (1,)), ((0,), (0,)))),
        (VE, r"batch dims do not match"))
    add("dot_general", "unknown keyword", lambda: ops.dot_general(x, w, (((1,), (0,)), ((), ())), foo=1),
        (TE, r"unsupported arguments.*foo"))
    add("dot_general", "repeated dim",
        lambda: ops.dot_general(_x((4, 4)), _x((4, 4, 4)), (((0, 0), (0, 1)), ((), ()))), (VE, r"repeats"))
    add("einsum", "subscripts not a string", lambda: ops.einsum(["ij"], x), (TE, r"subscripts"))
    add("einsum", "operand count differs", lambda: ops.einsum("ij,jk->ik", x), (VE, r"operands"))
    add("einsum", "integer operand", lambda: ops.einsum("ij,jk->ik", x, jnp.ones((4, 5), jnp.int32)),
        (TE, r"operands\[1\]"))
    add("einsum", "output index not in inputs", lambda: ops.einsum("ij,jk->iz", x, w),
        (VE, r"z|output"))
    add("einsum", "size mismatch on j", lambda: ops.einsum("ij,jk->ik", x, _x((3, 5))),
        (VE, r"(size|dimension|match|contract)"))

    # ---- reductions
    for name in ("sum", "mean", "max", "min", "logsumexp"):
        f = getattr(ops, name)
        add(name, "axis out of range", lambda f=f: f(x, axis=2), (VE, r"axis=2 is out of range.*rank 2"))
        add(name, "axis is a float", lambda f=f: f(x, axis=1.0), (TE, r"axis must be an int"),
            defect=None)
        add(name, "repeated axis", lambda f=f: f(x, axis=(1, -1)), (VE, r"repeats an axis"))
        add(name, "integer dtype", lambda f=f: f(jnp.ones((3, 4), jnp.int32)), (TE, r"\bx\b.*floating"))
        add(name, "bool axis", lambda f=f: f(x, axis=True), (TE, r"axis must be an int"),
            defect=None)
    add("sum", "empty axis", lambda: ops.sum(jnp.zeros((3, 0))),
        returns=lambda r: r.shape == (3,) and np.all(np.asarray(r) == 0), expected="zeros (empty sum)")
    add("mean", "empty axis", lambda: ops.mean(jnp.zeros((3, 0))),
        returns=lambda r: r.shape == (3,) and np.all(np.isnan(r)), expected="NaN (0/0), like jnp.mean")
    add("max", "empty axis, no initial", lambda: ops.max(jnp.zeros((3, 0))), (VE, r"empty.*initial"))
    add("max", "where without initial", lambda: ops.max(x, where=x > 0), (VE, r"initial"))
    add("logsumexp", "empty axis", lambda: ops.logsumexp(jnp.zeros((3, 0))),
        returns=lambda r: r.shape == (3,) and np.all(np.isneginf(r)), expected="-inf (log 0)")
    add("sum", "where of the wrong shape", lambda: ops.sum(x, where=jnp.ones((5,), bool)),
        (VE, r"where|shape|broadcast|[Ii]ncompatible"))
    add("sum", "NaN", lambda: ops.sum(_arr([[1.0, jnp.nan, 2.0], [1, 2, 3]])),
        returns=lambda r: np.isnan(r[0]) and r[1] == 6, expected="[NaN, 6]: NaN stays in its row")
    add("sum", "+inf + -inf", lambda: ops.sum(_arr([1.0, jnp.inf, -jnp.inf])),
        returns=lambda r: bool(np.isnan(r)), expected="NaN")
    add("sum", "+inf", lambda: ops.sum(_arr([1.0, jnp.inf])), returns=lambda r: bool(np.isposinf(r)),
        expected="+inf")
    add("sum", "f16 overflow", lambda: ops.sum(jnp.full((300,), 300.0, jnp.float16)),
        returns=lambda r: bool(np.isposinf(np.float32(r))), expected="+inf (90000 > f16 max)")
    add("max", "NaN", lambda: ops.max(_arr([1.0, jnp.nan, 2.0])), returns=lambda r: bool(np.isnan(r)),
        expected="NaN, like jnp.max")
    add("min", "NaN", lambda: ops.min(_arr([1.0, jnp.nan, 2.0])), returns=lambda r: bool(np.isnan(r)),
        expected="NaN, like jnp.min")
    add("max", "-inf only", lambda: ops.max(_arr([-jnp.inf, -jnp.inf])),
        returns=lambda r: bool(np.isneginf(r)), expected="-inf")
    add("logsumexp", "+inf", lambda: ops.logsumexp(_arr([1.0, jnp.inf])),
        returns=lambda r: bool(np.isposinf(r)), expected="+inf, like jax.nn.logsumexp")
    add("logsumexp", "all -inf", lambda: ops.logsumexp(_arr([-jnp.inf, -jnp.inf])),
        returns=lambda r: bool(np.isneginf(r)), expected="-inf, like jax.nn.logsumexp")
    add("logsumexp", "NaN", lambda: ops.logsumexp(_arr([1.0, jnp.nan])), returns=lambda r: bool(np.isnan(r)),
        expected="NaN")
    for name in ("argmax", "argmin"):
        f = getattr(ops, name)
        jf = getattr(jnp, name)
        add(name, "axis is a tuple", lambda f=f: f(x, axis=(0, 1)), (TE, r"axis must be an int or None"))
        add(name, "axis out of range", lambda f=f: f(x, axis=-3), (VE, r"out of range"))
        add(name, "empty axis", lambda f=f: f(jnp.zeros((3, 0))), (VE, r"empty axis"))
        add(name, "integer dtype", lambda f=f: f(jnp.ones((3, 4), jnp.int32)), (TE, r"\bx\b.*floating"))
        add(name, "NaN", lambda f=f: f(_arr([1.0, jnp.nan, 5.0, jnp.nan])),
            returns=lambda r: int(r) == 1, expected="1: the first NaN, like jnp")
        add(name, "ties", lambda f=f: f(_arr([2.0, 2.0, 2.0])), returns=lambda r: int(r) == 0,
            expected="0: the first of equal values")
        add(name, "axis=None, keepdims=True", lambda f=f: f(_x((2, 3)), axis=None, keepdims=True),
            returns=lambda r, jf=jf: r.shape == jf(_x((2, 3)), axis=None, keepdims=True).shape,
            expected="shape (1, 1), like jnp",
            defect=None)
    for name in ("softmax", "log_softmax"):
        f = getattr(ops, name)
        jf = getattr(jax.nn, name)
        add(name, "axis out of range", lambda f=f: f(x, axis=7), (VE, r"axis=7 is out of range"))
        add(name, "integer dtype", lambda f=f: f(jnp.ones((3, 4), jnp.int32)), (TE, r"\bx\b.*floating"))
        add(name, "empty axis", lambda f=f: f(jnp.zeros((3, 0))), returns=lambda r: r.shape == (3, 0),
            expected="an empty (3, 0) result")
        for case, v in (("+inf", [1.0, jnp.inf]), ("NaN", [1.0, jnp.nan, 0.0]),
                        ("all -inf", [-jnp.inf, -jnp.inf])):
            add(name, case, lambda f=f, v=v: f(_arr(v)),
                returns=lambda r, jf=jf, v=v: _eq_nan(r, jf(_arr(v))), expected=f"same as jax.nn.{name}",
                defect=None)
    # ---- rms_norm
    s4 = _x((4,))
    tbl = jnp.ones((4, 3), jnp.float32)
    add("embedding_lookup", "float ids", lambda: ops.embedding_lookup(tbl, jnp.ones((2,))),
        (TE, r"ids must be an integer"))
    add("embedding_lookup", "integer table", lambda: ops.embedding_lookup(jnp.ones((4, 3), jnp.int32),
                                                                          jnp.ones((2,), jnp.int32)),
        (TE, r"table"))
    add("embedding_lookup", "scalar table", lambda: ops.embedding_lookup(jnp.float32(1), jnp.ones((2,), jnp.int32)),
        (VE, r"table must have rank"))
    add("embedding_lookup", "id past the table", lambda: ops.embedding_lookup(tbl, jnp.array([4], jnp.int32)),
        returns=lambda r: bool(np.isnan(r).all()), expected="a NaN row, like jnp.take")
    add("embedding_lookup", "empty ids", lambda: ops.embedding_lookup(tbl, jnp.zeros((0,), jnp.int32)),
        returns=lambda r: r.shape == (0, 3), expected="an empty result")
    add("isolated", "fn not callable", lambda: ops.isolated(3, x), (TE, r"fn must be a callable"))
    add("isolated", "no array arguments", lambda: ops.isolated(jnp.tanh), (TE, r"array arguments"))
    add("isolated", "NaN and +-inf", lambda: ops.isolated(jnp.tanh, _arr([jnp.nan, jnp.inf, -jnp.inf])),
        returns=lambda r: bool(np.isnan(r[0])) and float(r[1]) == 1.0 and float(r[2]) == -1.0,
        expected="IEEE: tanh(NaN) = NaN, tanh(+-inf) = +-1")
    add("isolated", "empty array", lambda: ops.isolated(jnp.exp, jnp.zeros((0, 3))),
        returns=lambda r: r.shape == (0, 3), expected="an empty result")
    add("rms_norm", "scale length differs", lambda: ops.rms_norm(x, _x((5,))), (VE, r"scale.*\(5,\)"))
    add("rms_norm", "scale rank 2", lambda: ops.rms_norm(x, _x((1, 4))), (VE, r"scale must have rank 1"))
    add("rms_norm", "x is a scalar", lambda: ops.rms_norm(jnp.float32(1), s4), (VE, r"\bx\b.*rank"))
    add("rms_norm", "x integer", lambda: ops.rms_norm(jnp.ones((3, 4), jnp.int32), s4), (TE, r"\bx\b.*floating"))
    add("rms_norm", "eps=0", lambda: ops.rms_norm(x, s4, eps=0.0), (VE, r"eps"))
    add("rms_norm", "eps=NaN", lambda: ops.rms_norm(x, s4, eps=float("nan")), (VE, r"eps"))
    add("rms_norm", "offset is a string", lambda: ops.rms_norm(x, s4, offset="1"), (TE, r"offset"))
    add("rms_norm", "eps is a numpy float32", lambda: ops.rms_norm(x, s4, eps=np.float32(1e-6)),
        returns=lambda r: r.shape == (3, 4), expected="accepted (a positive number), like attention's numbers.Real options",
        defect=None)
    add("rms_norm", "NaN in row 0", lambda: ops.rms_norm(x.at[0, 0].set(jnp.nan), s4),
        returns=lambda r: bool(np.all(np.isnan(r[0]))) and bool(np.all(np.isfinite(r[1:]))),
        expected="row 0 NaN, other rows finite")
    add("rms_norm", "zero row", lambda: ops.rms_norm(jnp.zeros((2, 4)), s4),
        returns=lambda r: bool(np.all(np.asarray(r) == 0)), expected="zeros (0 * rsqrt(eps))")
    # ---- scans
    for name in ("cumsum", "cumlogsumexp", "cummax", "cummin"):
        f = getattr(ops, name)
        add(name, "axis is a tuple", lambda f=f: f(x, axis=(0,)), (TE, r"axis must be an int"))
        add(name, "axis out of range", lambda f=f: f(x, axis=2), (VE, r"axis=2 is out of range"))
        add(name, "reverse='yes'", lambda f=f: f(x, reverse="yes"), (TE, r"reverse must be a bool"))
        add(name, "x is a scalar", lambda f=f: f(jnp.float32(1)), (VE, r"rank >= 1"))
        add(name, "integer dtype", lambda f=f: f(jnp.ones((3, 4), jnp.int32)), (TE, r"\bx\b.*floating"))
        add(name, "empty axis", lambda f=f: f(jnp.zeros((3, 0))), returns=lambda r: r.shape == (3, 0),
            expected="an empty (3, 0) result")
        lf = {"cumsum": jax.lax.cumsum, "cumlogsumexp": jax.lax.cumlogsumexp, "cummax": jax.lax.cummax,
              "cummin": jax.lax.cummin}[name]
        for case, v in (("NaN", [1.0, jnp.nan, 2.0]), ("inf", [1.0, jnp.inf, -jnp.inf, 2.0]),
                        ("-inf prefix", [-jnp.inf, -jnp.inf, 0.5])):
            add(name, case, lambda f=f, v=v: f(_arr(v)),
                returns=lambda r, lf=lf, v=v: _eq_nan(r, lf(_arr(v), axis=0)), expected=f"same as lax.{name}")
    # ---- attention / decode_attention
    q, kv = _Q(), _KV()
    add("attention", "q rank 3", lambda: ops.attention(q[0], kv, kv), (VE, r"\bq must have rank 4"))
    add("attention", "k dtype differs", lambda: ops.attention(q, kv.astype(jnp.bfloat16), kv),
        (TE, r"share one dtype"))
    add("attention", "q integer", lambda: ops.attention(q.astype(jnp.int32), kv, kv), (TE, r"\bq must have dtype"))
    add("attention", "k and v shapes differ", lambda: ops.attention(q, kv, _KV(s=4)), (VE, r"\bk and v\b"))
    add("attention", "batch differs", lambda: ops.attention(_Q(b=2), kv, kv), (VE, r"same batch size"))
    add("attention", "head_dim differs", lambda: ops.attention(q, _KV(h=4), _KV(h=4)), (VE, r"head_dim"))
    add("attention", "heads not a multiple", lambda: ops.attention(_Q(n=3), _KV(k=2), _KV(k=2)),
        (VE, r"multiple"))
    add("attention", "causal='yes'", lambda: ops.attention(q, kv, kv, causal="yes"), (TE, r"causal"))
    add("attention", "sliding_window=0", lambda: ops.attention(q, kv, kv, sliding_window=0), (VE, r"sliding_window"))
    add("attention", "sliding_window=2.5", lambda: ops.attention(q, kv, kv, sliding_window=2.5),
        (VE, r"sliding_window"))
    add("attention", "logits_soft_cap=-1", lambda: ops.attention(q, kv, kv, logits_soft_cap=-1.0),
        (VE, r"logits_soft_cap"))
    add("attention", "scale=NaN", lambda: ops.attention(q, kv, kv, scale=float("nan")), (VE, r"scale"))
    add("attention", "scale is an array", lambda: ops.attention(q, kv, kv, scale=jnp.float32(0.5)),
        (VE, r"scale"))
    add("attention", "kv_lengths > S", lambda: ops.attention(q, kv, kv, kv_lengths=jnp.array([4])),
        (VE, r"kv_lengths must lie in \[0, 3\]"))
    add("attention", "kv_lengths negative", lambda: ops.attention(q, kv, kv, kv_lengths=jnp.array([-1])),
        (VE, r"kv_lengths"))
    add("attention", "kv_lengths float", lambda: ops.attention(q, kv, kv, kv_lengths=jnp.array([2.0])),
        (TE, r"kv_lengths must be an integer"))
    add("attention", "q_positions wrong shape", lambda: ops.attention(q, kv, kv, q_positions=jnp.zeros((3,), jnp.int32)),
        (VE, r"q_positions must have shape \(1, 3\)"))
    add("attention", "no keys (S=0)", lambda: ops.attention(q, _KV(s=0), _KV(s=0)),
        returns=lambda r: r.shape == q.shape and bool(np.all(np.asarray(r) == 0)),
        expected="zeros (a query with no valid key returns exactly 0)")
    add("attention", "T=0", lambda: ops.attention(_Q(t=0), kv, kv), returns=lambda r: r.shape == (1, 0, 2, 8),
        expected="an empty result")
    add("attention", "kv_lengths=0", lambda: ops.attention(q, kv, kv, kv_lengths=jnp.array([0])),
        returns=lambda r: bool(np.all(np.asarray(r) == 0)), expected="zeros")
    add("attention", "NaN in keys past kv_lengths",
        lambda: (ops.attention(q, kv.at[:, 2:].set(jnp.nan), kv.at[:, 2:].set(jnp.nan), kv_lengths=jnp.array([2])),
                 ops.attention(q, kv.at[:, 2:].set(0), kv.at[:, 2:].set(0), kv_lengths=jnp.array([2]))),
        returns=lambda r: _same_bits(*r), expected="the same bits as zeros there (never read)")
    add("attention", "NaN in q row 0 (batch 2)",
        lambda: ops.attention(_Q(b=2).at[0, 0, 0, 0].set(jnp.nan), _KV(b=2), _KV(b=2)),
        returns=lambda r: bool(np.isnan(r[0, 0, 0]).all()) and bool(np.isfinite(r[1]).all()),
        expected="NaN in that query row (head) only, like jax.nn.dot_product_attention",
        defect=None)
    add("attention", "NaN in a causally masked (future) value",
        lambda: (ops.attention(_Q(b=1), _KV(b=1), _KV(b=1).at[0, 2].set(jnp.nan))[0, 0],
                 ops.decode_attention(_Q(b=1)[:, :1], _KV(b=1), _KV(b=1).at[0, 2].set(jnp.nan),
                                      jnp.array([1]))[0, 0]),
        returns=lambda r: bool(np.isfinite(r[0]).all()) and _same_bits(r[0], r[1]),
        expected="query 0 (sees key 0 only) finite and equal to decode at length 1 (decode = prefill)",
        defect=None)
    L = _KV(s=8)
    add("decode_attention", "lengths > max_len", lambda: ops.decode_attention(q, L, L, jnp.array([9])),
        (VE, r"lengths must lie in \[0, 8\]"))
    add("decode_attention", "lengths wrong shape", lambda: ops.decode_attention(q, L, L, jnp.array([1, 2])),
        (VE, r"lengths must have shape \(1,\)"))
    add("decode_attention", "lengths float", lambda: ops.decode_attention(q, L, L, jnp.array([2.0])),
        (TE, r"lengths must be an integer"))
    add("decode_attention", "lengths a Python int", lambda: ops.decode_attention(q, L, L, 3),
        (VE, r"lengths must have shape"))
    add("decode_attention", "k_cache/v_cache differ", lambda: ops.decode_attention(q, L, _KV(s=9), jnp.array([3])),
        (VE, r"k_cache and v_cache"))
    add("decode_attention", "q rank 3", lambda: ops.decode_attention(q[0], L, L, jnp.array([3])),
        (VE, r"\bq must have rank 4"))
    add("decode_attention", "lengths < Tq (negative positions)",
        lambda: ops.decode_attention(q, L, L, jnp.array([1])),
        returns=lambda r: bool(np.all(np.asarray(r[0, :2]) == 0)) and bool(np.any(np.asarray(r[0, 2]) != 0)),
        expected="rows at negative positions are 0")
    add("decode_attention", "NaN in the cache past lengths",
        lambda: (ops.decode_attention(q, L.at[:, 5:].set(jnp.nan), L.at[:, 5:].set(jnp.inf), jnp.array([5])),
                 ops.decode_attention(q, L.at[:, 5:].set(0), L.at[:, 5:].set(0), jnp.array([5]))),
        returns=lambda r: _same_bits(*r), expected="the same bits as zeros there (never read)")
    # ---- deterministic / wrap
    add("deterministic", "not callable", lambda: detjax.deterministic(5), (TE, r"callable"))
    add("deterministic", "convolution (strict)",
        lambda: detjax.deterministic(lambda a: jnp.convolve(a, a))(_x((8,))),
        (NondeterministicOpError, r"conv_general_dilated.*float32\[.*\].*strict=False"))
    add("deterministic", "float scatter-add with repeated indices (strict)",
        lambda: detjax.deterministic(lambda a, i: jnp.zeros(4).at[i].add(a))(_x((5,)), jnp.array([0, 1, 1, 2, 0])),
        (NondeterministicOpError, r"scatter-add"))
    add("deterministic", "fft (strict)", lambda: detjax.deterministic(lambda a: jnp.fft.fft(a).real)(_x((8,))),
        (NondeterministicOpError, r"fft"))
    add("deterministic", "strict=False warns once and runs",
        lambda: _warns(lambda: detjax.deterministic(lambda a: jnp.convolve(a, a), strict=False)(_x((8,)))),
        returns=lambda r: r[0] == 1 and r[1].shape == (15,), expected="one warning, a (15,) result")
    add("deterministic", "integer reduction", lambda: detjax.deterministic(lambda a: a.sum(-1))(jnp.arange(12).reshape(3, 4)),
        returns=lambda r: r.tolist() == [6, 22, 38], expected="exact integer result (left to XLA)")
    add("deterministic", "NaN in a batch row",
        lambda: detjax.deterministic(lambda a: jax.nn.softmax(a @ w, -1))(x.at[0, 0].set(jnp.nan)),
        returns=lambda r: bool(np.isnan(r[0]).all()) and bool(np.isfinite(r[1:]).all()),
        expected="NaN in that row only")
    add("wrap", "not callable", lambda: detjax.wrap(5), (TE, r"callable"),
        defect=None)
    # ---- generate
    add("generate", "model is not a Transformer", lambda: detjax.generate(object(), [[1]], 2), (TE, r"model"))
    add("generate", "no prompts", lambda: _gen(prompts=[]), (VE, r"at least one prompt"))
    add("generate", "prompts is a string", lambda: _gen(prompts="hello"), (TE, r"prompts"))
    add("generate", "empty prompt", lambda: _gen(prompts=[[1], []]), (VE, r"prompts\[1\] is empty"))
    add("generate", "token id >= vocab", lambda: _gen(prompts=[[1, 256]]), (VE, r"prompts\[0\].*outside \[0, 256\)"))
    add("generate", "negative token id", lambda: _gen(prompts=[[-1]]), (VE, r"prompts\[0\]"))
    add("generate", "float token ids", lambda: _gen(prompts=[[1.5, 2.0]]), (TE, r"prompts\[0\] must contain ints"))
    add("generate", "nested prompt", lambda: _gen(prompts=[[[1, 2]]]), (VE, r"prompts\[0\] must be a flat"))
    add("generate", "max_new_tokens=0", lambda: _gen(max_new_tokens=0), (VE, r"max_new_tokens must be >= 1"))
    add("generate", "max_new_tokens=2.0", lambda: _gen(max_new_tokens=2.0), (TE, r"max_new_tokens must be an int"))
    add("generate", "temperature=-1", lambda: _gen(temperature=-1.0), (VE, r"temperature"))
    add("generate", "temperature=NaN", lambda: _gen(temperature=float("nan")), (VE, r"temperature"))
    add("generate", "temperature='hot'", lambda: _gen(temperature="hot"), (TE, r"temperature"))
    add("generate", "top_k=0", lambda: _gen(top_k=0, temperature=1.0), (VE, r"top_k"))
    add("generate", "top_p=0", lambda: _gen(top_p=0.0, temperature=1.0), (VE, r"top_p"))
    add("generate", "top_p=1.5", lambda: _gen(top_p=1.5, temperature=1.0), (VE, r"top_p"))
    add("generate", "seed=1.5", lambda: _gen(seed=1.5), (TE, r"seed"))
    add("generate", "stop token -1", lambda: _gen(stop_tokens=[-1]), (VE, r"stop_tokens\[0\]"))
    add("generate", "max_len too small", lambda: _gen(max_len=3), (VE, r"max_len=3 is too small"))
    add("generate", "sequence_ids length differs", lambda: _gen(sequence_ids=[1, 2]), (VE, r"sequence_ids"))
    add("generate", "sequence_ids negative", lambda: _gen(sequence_ids=[-1]), (VE, r"sequence_ids\[0\]"))
    add("generate", "sequence_ids >= 2**32", lambda: _gen(sequence_ids=[2**40]), (VE, r"sequence_ids\[0\]"),
        defect=None)
    add("generate", "seed < -2**31", lambda: _gen(seed=-2**40), (VE, r"seed"),
        defect=None)
    add("generate", "huge max_new_tokens=10**12", lambda: _gen(max_new_tokens=10**12),
        (VE, r"max_new_tokens|max_len|too large"),
        defect=None)
    add("generate", "huge max_len=2**40", lambda: _gen(max_len=2**40), (VE, r"max_len"),
        defect=None)
    # ---- GemmaConfig (huge sizes, checked abstractly)
    add("GemmaConfig", "vocab_size=0", lambda: _tiny_config_eval_shape(vocab_size=0), (VE, r"vocab_size"))
    add("GemmaConfig", "num_heads not a multiple of num_kv_heads", lambda: _tiny_config_eval_shape(num_heads=3),
        (VE, r"num_heads|num_kv_heads"))
    # ---- checkpoint
    add("checkpoint.save", "not a Transformer", lambda: ck.save("/tmp/detjax-rel-never", object()), (TE, r"model"))
    add("checkpoint.save", "existing non-empty directory", lambda: ck.save(_saved_ckpt(), _model()),
        (ck.CheckpointError, r"already exists"))
    add("checkpoint.restore", "path is a file", lambda: ck.restore(os.path.join(_saved_ckpt(), "COMPLETE")),
        (ck.CheckpointError, r"no checkpoint directory"))
    add("checkpoint.restore", "flipped bytes in the orbax data files", _ckpt_flip_bytes,
        returns=lambda r: (r[0] == "CheckpointError" and ("sha256" in r[1] or "orbax could not read" in r[1]))
        or r == ("restored", True),
        expected="CheckpointError (hash mismatch or unreadable), never different parameters")
    add("checkpoint.restore", "fingerprint from another backend", _ckpt_other_backend,
        returns=lambda r: r is True, expected="CheckpointEnvironmentWarning naming that backend; model restored")
    add("checkpoint.restore", "fingerprint hash changed, same environment", _ckpt_same_env_other_hash,
        (ck.CheckpointError, r"probe logits differ.*environment is the same"))
    add("checkpoint.restore", "fingerprint.json without environment",
        lambda: _ckpt_restore_edit("fingerprint.json", lambda fp: fp.pop("environment")),
        (ck.CheckpointError, r"fingerprint.json is malformed"))
    add("checkpoint.restore", "params.sha256.json missing one parameter",
        lambda: _ckpt_restore_edit("params.sha256.json", lambda h: h.pop(sorted(h)[0])),
        (ck.CheckpointError, r"do not match config.json's architecture"))
    add("checkpoint.restore", "format_version 2",
        lambda: _ckpt_restore_edit("config.json", lambda m: m.__setitem__("format_version", 2)),
        (ck.CheckpointError, r"format_version"))
    add("checkpoint.restore", "parameter dtype recorded differently",
        lambda: _ckpt_restore_edit("params.sha256.json",
                                   lambda h: h[sorted(h)[0]].__setitem__("dtype", "float16")),
        (ck.CheckpointError, r"mismatched config"))
    # ---- backend
    add("backend", "backend=3", lambda: ops.sum(x, backend=3), (TE, r"backend must be a string"))
    add("backend", "backend='gpu' on CPU" if jax.default_backend() == "cpu" else "backend='tpu' on GPU",
        lambda: ops.sum(x, backend="gpu" if jax.default_backend() == "cpu" else "tpu"),
        (VE, r"was requested but JAX's default device"))
    add("backend", "DETJAX_BACKEND=nope", lambda: _with_env("DETJAX_BACKEND", "nope", lambda: ops.sum(x)),
        (VE, r"DETJAX_BACKEND='nope' is not a detjax backend"))
    # ---- CLI
    add("cli", "no command", lambda: _cli(), returns=_cli_expect(2, r"required|command"),
        expected="exit 2, usage line")
    add("cli", "demo --model nope", lambda: _cli("demo", "--model", "nope"),
        returns=_cli_expect(2, r"unknown model 'nope'"), expected="exit 2, names the model")
    add("cli", "demo --num-samples 0", lambda: _cli("demo", "--num-samples", "0"),
        returns=_cli_expect(2, r"--num-samples.*positive integer"), expected="exit 2")
    add("cli", "demo --max-new-tokens x", lambda: _cli("demo", "--max-new-tokens", "x"),
        returns=_cli_expect(2, r"--max-new-tokens.*positive integer"), expected="exit 2")
    add("cli", "demo --temperature -1", lambda: _cli("demo", "--temperature", "-1"),
        returns=_cli_expect(2, r"--temperature must be >= 0"), expected="exit 2")
    add("cli", "demo --backend foo", lambda: _cli("demo", "--backend", "foo"),
        returns=_cli_expect(2, r"not a detjax backend"), expected="exit 2")
    add("cli", "demo --checkpoint /nonexistent", lambda: _cli("demo", "--checkpoint", "/nonexistent/ck"),
        returns=_cli_expect(2, r"cannot read checkpoint.*no checkpoint directory"), expected="exit 2")
    add("cli", "demo --max-len 4 (too small)", lambda: _cli("demo", "--max-len", "4"),
        returns=_cli_expect(2, r"max.len"), expected="exit 2 (bad input), names --max-len",
        defect=None)
    add("cli", "demo --max-len 10**12 (huge)", lambda: _cli("demo", "--max-len", str(10**12)),
        returns=_cli_expect(2, r"max.len"), expected="exit 2 before any allocation",
        defect=None)
    add("cli", "check without ':'", lambda: _cli("check", "detjax.ops.sum"),
        returns=_cli_expect(2, r"MODULE:FUNCTION"), expected="exit 2")
    add("cli", "check unknown module", lambda: _cli("check", "no_such_module_xyz:f"),
        returns=_cli_expect(2, r"cannot import module 'no_such_module_xyz'"), expected="exit 2")
    add("cli", "check missing attribute", lambda: _cli("check", "detjax.ops:nope"),
        returns=_cli_expect(2, r"has no attribute 'nope'"), expected="exit 2")
    add("cli", "check not callable", lambda: _cli("check", "detjax:__version__"),
        returns=_cli_expect(2, r"not callable"), expected="exit 2")
    add("cli", "check --args-shape 4,x", lambda: _cli("check", "detjax.ops:sum", "--args-shape", "4,x"),
        returns=_cli_expect(2, r"--args-shape.*'x' is not an integer"), expected="exit 2")
    add("cli", "check --args-shape 0,4", lambda: _cli("check", "detjax.ops:sum", "--args-shape", "0,4"),
        returns=_cli_expect(2, r"--args-shape.*>= 1"), expected="exit 2")
    add("cli", "check --dtype int8", lambda: _cli("check", "detjax.ops:sum", "--dtype", "int8"),
        returns=_cli_expect(2, r"--dtype"), expected="exit 2")
    add("cli", "check --batch-sizes 0", lambda: _cli("check", "detjax.ops:sum", "--batch-sizes", "0"),
        returns=_cli_expect(2, r"--batch-sizes"), expected="exit 2")
    add("cli", "check --runs 1,2", lambda: _cli("check", "detjax.ops:sum", "--runs", "1,2"),
        returns=_cli_expect(2, r"--runs"), expected="exit 2")
    add("cli", "check leading dims differ", lambda: _cli("check", "detjax.ops:matmul", "--args-shape", "4,16;3,16"),
        returns=_cli_expect(2, r"same leading"), expected="exit 2")
    add("cli", "check int args into a float op", lambda: _cli("check", "detjax.ops:sum", "--dtype", "int32"),
        returns=_cli_expect(2, r"cannot be called with int32.*floating"), expected="exit 2, names the dtype")
    add("cli", "check --backend gpu on CPU" if jax.default_backend() == "cpu" else "check --backend tpu",
        lambda: _cli("check", "detjax.ops:sum", "--backend", "gpu" if jax.default_backend() == "cpu" else "tpu"),
        returns=_cli_expect(2, r"was requested"), expected="exit 2")
    return E


def _warns(fn):
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = fn()
    return len([x for x in w if "strict=False" in str(x.message)]), r


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class _LazyTable(list):
    def __init__(self):
        super().__init__()
        self._built = False

    def _build(self):
        if not self._built:
            self._built = True
            self.extend(_build_bad_inputs())

    def __iter__(self):
        self._build()
        return super().__iter__()

    def __len__(self):
        self._build()
        return super().__len__()

    def __getitem__(self, i):
        self._build()
        return super().__getitem__(i)


BAD_INPUTS = _LazyTable()


def evaluate(e: BadInput) -> dict:
    """Run one entry; status 'ok', 'FAIL', 'xfail (known defect)' or 'XPASS (defect fixed?)'."""
    import re
    row = dict(function=e.function, case=e.case, defect=e.defect)
    if e.raises:
        types, pat = e.raises
        types = types if isinstance(types, tuple) else (types,)
        row["expected"] = f"{' or '.join(t.__name__ for t in types)} matching /{pat}/"
    else:
        row["expected"] = e.expected
    ok = False
    try:
        r = e.thunk()
        if e.raises:
            row["got"] = f"no error; returned {type(r).__name__}"
        else:
            ok = bool(e.returns(r))
            row["got"] = "as documented" if ok else f"returned {_short(r)}"
    except _WouldAllocate as ex:
        row["got"] = f"NOT rejected before allocation: {ex}"
    except Exception as ex:  # noqa: BLE001
        msg = str(ex).splitlines()[0] if str(ex) else ""
        row["got"] = f"{type(ex).__name__}: {msg[:300]}"
        if e.raises:
            ok = isinstance(ex, types) and re.search(pat, str(ex), re.S) is not None
    if e.defect:
        row["status"] = "XPASS (defect fixed?)" if ok else "xfail (known defect)"
    else:
        row["status"] = "ok" if ok else "FAIL"
    return row


def _short(r):
    try:
        a = np.asarray(r)
        return f"{a.dtype}{list(a.shape)} {np.array2string(a.ravel()[:6], precision=3)}"
    except Exception:  # noqa: BLE001
        return repr(r)[:200]


def bad_input_markdown(rows, env) -> str:
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_x = sum(r["status"].startswith("xfail") for r in rows)
    lines = ["# detjax bad-input table", "",
             f"`python scripts/reliability.py --bad-input-table` (also `tests/test_bad_input.py`); "
             f"device `{env['device']}`, detjax backend `{env['detjax_backend']}`, jax {env['jax']}, "
             f"{env['date']}.", "",
             f"{len(rows)} entries: {n_ok} ok, {n_x} known defects (xfail, strict), "
             f"{len(rows) - n_ok - n_x} unexpected.", "",
             "Each invalid input must raise a clear error naming the argument (type + pattern), or "
             "give the documented IEEE / empty result; never a crash inside a kernel. Huge sizes "
             "are checked with the allocation point replaced by a sentinel (or abstractly).", "",
             "| function | input | expected | got | status |", "|---|---|---|---|---|"]
    for r in rows:
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {r['function']} | {esc(r['case'])} | {esc(r['expected'])} | {esc(r['got'])} | "
                     f"{r['status']} |")
    defects = [r for r in rows if r["defect"]]
    if defects:
        lines += ["", "## Known defects (modules owned elsewhere)", ""]
        for r in defects:
            lines.append(f"- **{r['function']}: {r['case']}**: {r['defect']}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    ap.add_argument("--out", default=None, help="output folder (default results/reliability/<profile>)")
    ap.add_argument("--only", choices=("all", "fuzz", "stress"), default="all")
    ap.add_argument("--ops", default=None, help="comma-separated subset of ops to fuzz")
    ap.add_argument("--seed", type=int, default=None, help="configuration pool seed (default random)")
    ap.add_argument("--cases", type=int, default=None, help="override cases per op")
    ap.add_argument("--configs", type=int, default=None, help="override configurations per op")
    ap.add_argument("--op-time-limit", type=float, default=None, help="override seconds per op")
    ap.add_argument("--bad-input-table", action="store_true",
                    help="evaluate the bad-input table and write bad_input.md (and nothing else)")
    args = ap.parse_args(argv)
    env = environment()
    if args.bad_input_table:
        out = Path(args.out or ROOT / "results" / "reliability")
        out.mkdir(parents=True, exist_ok=True)
        rows = [evaluate(e) for e in BAD_INPUTS]
        (out / "bad_input.md").write_text(bad_input_markdown(rows, env))
        bad = [r for r in rows if r["status"] not in ("ok", "xfail (known defect)")]
        print(f"bad-input table: {len(rows)} entries, "
              f"{sum(r['status'] == 'ok' for r in rows)} ok, "
              f"{sum(r['status'].startswith('xfail') for r in rows)} known defects, "
              f"{len(bad)} unexpected -> {out / 'bad_input.md'}")
        for r in bad:
            print(f"  UNEXPECTED {r['function']}: {r['case']}: {r['got']}")
        return 0 if not bad else 1
    out = Path(args.out or ROOT / "results" / "reliability" / args.profile)
    out.mkdir(parents=True, exist_ok=True)
    p = PROFILES[args.profile]
    print(f"detjax reliability, profile {args.profile}: {env}", flush=True)
    fz = stress_res = None
    if args.only in ("all", "fuzz"):
        for k in ("cases", "configs", "op_time_limit"):
            if getattr(args, k) is not None:
                p[k] = getattr(args, k)
        t0 = time.perf_counter()
        fz = fuzz_all(args.profile, args.seed, args.ops.split(",") if args.ops else None)
        fz["seconds"] = time.perf_counter() - t0
        (out / "fuzz.json").write_text(json.dumps(
            dict(profile=args.profile, environment=env, seed=fz["seed"], seconds=fz["seconds"],
                 uncovered=fz["uncovered"],
                 stats={k: dict(v.to_dict(), seed=v.seed, pool=v.pool) for k, v in fz["stats"].items()}),
            indent=1))
        (out / "fuzz.md").write_text(fuzz_markdown(fz, args.profile, env))
        figures(fz, out, f"{args.profile}, {env['device']}")
    if args.only in ("all", "stress"):
        t0 = time.perf_counter()
        stress_res = stress(p["stress_forwards"], p["stress_generations"], p["threads"],
                            batch_sizes=p["stress_batch_sizes"], time_limit=p["stress_time_limit"])
        stress_res["seconds"] = time.perf_counter() - t0
        stress_res["environment"] = env
        (out / "stress.json").write_text(json.dumps(stress_res, indent=1))
    print()
    print(summary_table(fz, stress_res))
    bad = (fz and any(s.total_mismatches for s in fz["stats"].values())) or \
          (stress_res and not stress_res["ok"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
