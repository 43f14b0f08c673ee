"""Deterministic data- and tensor-parallel execution of detjax models with ``jax.sharding``.

Design (decided, and what every function here follows): **no contraction is ever split across
devices.** Every output element of every matmul / attention / reduction is computed entirely on one
device, by the same detjax kernel, with the same fixed K order as on a single device. So neither the
data-parallel (DP) nor the tensor-parallel (TP) degree can change the bits.

* **Mesh**: axes ``'data'`` (batch) and ``'model'`` (tensor parallel); ``make_mesh(dp, tp)``.
* **Execution: ``jax.jit`` + ``jax.shard_map`` with explicit ``all_gather``** (not GSPMD
  auto-partitioning). A ``pallas_call`` is not auto-partitioned: compiled on a GPU it is an opaque
  custom call that XLA replicates (gathering its inputs); under the CPU interpreter it becomes loops
  of dynamic slices that the partitioner may also replicate or reshard as it likes. ``shard_map``
  runs each device's kernel on its local block, which is exactly what the bitwise argument needs, and
  every collective in the program is one we wrote. Inputs/parameters are placed with
  ``NamedSharding`` (``shard_batch``, ``tensor_parallel``) so jit's input shardings match the
  ``shard_map`` specs and no resharding is inserted.
* **DP**: the batch is sharded over ``'data'``; rows never share arithmetic in detjax kernels
  (batch invariance), so each row's bits equal the single-device run.
* **TP** (``tensor_parallel(model, mesh)``), only non-contracted dims are sharded over ``'model'``:
  q/k/v projections and attention by heads (KV heads are *replicated* - exact copies - when the TP
  degree exceeds ``num_kv_heads``); MLP gate/up by the hidden dim; the output projection and the
  MLP down projection ("row parallel" in Megatron) instead **all-gather their input activation**
  (heads / hidden) and shard their **output dim** ``d_model``, then all-gather the output; the tied
  embedding is sharded by vocabulary: the logits come out vocabulary-sharded (the unembedding
  contracts ``d_model``, unsplit) and the lookup gathers each token's row from its owner device
  (a copy, no arithmetic). Norms, RoPE and the residual stream are computed redundantly on every
  device (same kernel, same bits). Consequently the compiled TP program contains **no all-reduce
  on float data**: ``assert_no_float_allreduce(compiled.as_text())`` checks it.
  ``mode='psum'`` builds the usual Megatron TP instead (row-parallel projections contract a split K
  and ``psum`` the partials): it exists only as the negative control / benchmark baseline.
* **Deterministic gradient reduction**: ``deterministic_allreduce_sum(x, axis_name)`` =
  ``all_gather`` + a sequential sum in ascending device index (``ordered_sum``); never ``psum``,
  whose order belongs to the collective library. Equality *across DP degrees* needs more: a
  per-device partial sums a degree-dependent group of examples. ``dp_value_and_grad`` therefore
  defines the gradient as the sum of per-block gradients (``block_size`` consecutive examples per
  block, each block's backward a fixed detjax program), added **sequentially in ascending global
  block order**: each device computes its blocks' gradients, ``deterministic_allreduce_sum(...,
  blocks=True)`` gathers them in global order and sums them ascending. The bits are then the same
  for every DP degree (any degree that divides the number of blocks), and run to run.
  Cost: the gather holds ``num_blocks`` gradient copies per device (a ``ppermute`` chain over the
  devices in ascending order would give the same bits holding one; not written yet).
* **TP (and DP x TP) training**: ``tp_value_and_grad(pmodel, tokens)`` / ``tp_train_step``:
  loss and gradients bitwise equal to ``dp_value_and_grad`` on one device for every TP and DP
  degree. The backward keeps the rule: a sharded weight's gradient (a contraction over tokens) is
  computed locally; every backward reduction over a *sharded* dimension (a projection's input
  gradient, the QK-norm scale shared by heads, dK/dV of a GQA group split over devices) is a
  ``custom_vjp`` that all-gathers its operands and runs the single-device op on them, redundantly
  on each TP device; activation all-gathers transpose to a slice (the cotangent is replicated),
  never to a reduce-scatter. Blocks over ``'data'`` are summed as in ``dp_value_and_grad``.
  No float all-reduce in the compiled program (``tp_grad_hlo``). ``grad_reduce='psum'``
  (Megatron's backward) is the negative control.
* **Generation**: ``generate(pmodel, prompts, ...)`` runs ``detjax.generate`` on the parallel
  model (its ``prefill`` / ``decode_step`` are ``shard_map``-ped); under DP the prompts are padded to
  a multiple of the DP degree with copies of the last prompt (rows are independent), and the copies
  are dropped.

GPUs: tensor parallelism requires ``XLA_FLAGS=--xla_gpu_autotune_level=0`` (``tensor_parallel``
raises without it). XLA's fusion autotuner picks a native or a Triton block-level emitter per fusion
by timing, so per process, and the two round elementwise code differently: with default flags the
TP=2 gradients on two H200s were 1 ulp off one device in 3 of 3 processes; with the flag the TP
forward, gradients and train step were equal in 4 of 4 (README, "Several devices").
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from detjax.generate import GenerationResult
from detjax.ops._gather import embedding_lookup
from detjax.generate import generate as _generate
from detjax.models.gemma import final_logits, scale_embedding
from detjax.nn._impl import ops as _ops
from detjax.nn._layers import _compute_dtype, _dt, geglu

__all__ = ["DATA", "MODEL", "make_mesh", "shard_batch", "replicate", "tensor_parallel",
           "data_parallel", "ParallelTransformer", "forward", "generate", "ordered_sum",
           "deterministic_allreduce_sum", "dp_value_and_grad", "dp_train_step",
           "tp_value_and_grad", "tp_train_step", "tp_grad_hlo", "unshard",
           "assert_no_float_allreduce", "float_allreduces"]

DATA, MODEL = "data", "model"


# ---------------------------------------------------------------------------------------------
# Meshes and placement

def make_mesh(dp: int = 1, tp: int = 1, devices=None) -> Mesh:
    """A ``(dp, tp)`` mesh with axes ``('data', 'model')`` over the first ``dp * tp`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    for n, v in (("dp", dp), ("tp", tp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{n} must be a positive int; got {v!r}")
    if dp * tp > len(devices):
        raise ValueError(f"dp * tp = {dp * tp} devices needed; {len(devices)} available")
    return Mesh(np.asarray(devices[:dp * tp], dtype=object).reshape(dp, tp), (DATA, MODEL))


def _size(mesh, name):
    return int(mesh.shape[name]) if name in mesh.axis_names else 1


def _ax(mesh, name):
    return name if name in mesh.axis_names else None


def shard_batch(mesh: Mesh, x):
    """Place ``x`` (an array or pytree) with its leading (batch) axis sharded over ``'data'``."""
    d = _ax(mesh, DATA)
    n = _size(mesh, DATA)

    def put(a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] % n:
            raise ValueError(f"batch axis of shape {a.shape} is not divisible by the 'data' axis "
                             f"size {n}")
        return jax.device_put(a, NamedSharding(mesh, P(d)))

    return jax.tree.map(put, x)


def replicate(mesh: Mesh, x):
    """Place ``x`` (array or pytree) replicated on every device of ``mesh``."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), x)


# ---------------------------------------------------------------------------------------------
# Deterministic reductions

def ordered_sum(xs, axis: int = 0):
    """Sum ``xs`` over ``axis`` sequentially in ascending index: ``((x0 + x1) + x2) + ...``.

    Floating inputs narrower than float32 accumulate in float32 and are rounded once at the end.
    The order is explicit in the program (a ``lax.scan``), independent of shapes and devices.
    """
    xs = jnp.moveaxis(jnp.asarray(xs), axis, 0)
    dt = xs.dtype
    acc_dt = jnp.promote_types(dt, jnp.float32) if jnp.issubdtype(dt, jnp.floating) else dt
    xs = xs.astype(acc_dt)
    if xs.shape[0] == 1:
        return xs[0].astype(dt)
    acc, _ = jax.lax.scan(lambda c, x: (c + x, None), xs[0], xs[1:])
    return acc.astype(dt)


def deterministic_allreduce_sum(x, axis_name, *, blocks: bool = False):
    """All-reduce (sum) over the mesh axis ``axis_name`` in a fixed order; use inside ``shard_map``.

    ``blocks=False``: each device holds one partial ``x``; the partials are gathered
    (``all_gather``) and added in ascending device index. ``blocks=True``: each device holds a
    leading axis of per-block partials (its consecutive blocks, in global block order); they are
    gathered into the global block order and added ascending over *all blocks* - the result does
    not depend on how many devices the blocks were spread over. Works on pytrees. Never ``psum``.
    """
    def one(a):
        g = jax.lax.all_gather(a, axis_name, axis=0, tiled=blocks)
        return ordered_sum(g, 0)

    return jax.tree.map(one, x)


# ---------------------------------------------------------------------------------------------
# HLO inspection

_FLOAT_TYPES = ("f16[", "bf16[", "f32[", "f64[", "f8e")
_REDUCING = re.compile(r"\b(all-reduce|all-reduce-start|reduce-scatter)\(")


def float_allreduces(hlo_text: str) -> list:
    """The HLO instructions of ``hlo_text`` that all-reduce / reduce-scatter floating data."""
    bad = []
    for line in hlo_text.splitlines():
        m = _REDUCING.search(line)
        if not m or "=" not in line:
            continue
        rhs = line.split("=", 1)[1]
        result_type = rhs[:_REDUCING.search(rhs).start()]
        if any(t in result_type for t in _FLOAT_TYPES):
            bad.append(line.strip())
    return bad


def assert_no_float_allreduce(hlo_text: str):
    """Raise ``AssertionError`` if the (compiled) HLO text all-reduces floating-point data."""
    bad = float_allreduces(hlo_text)
    if bad:
        raise AssertionError(f"{len(bad)} floating-point all-reduce(s) in the program; first: "
                             f"{bad[0][:300]}")


# ---------------------------------------------------------------------------------------------
# Tensor-parallel parameter placement

def _path_names(path):
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return [n for n in out if n != "value"]


def _param_spec(names, ndim, model_axis, mode):
    """PartitionSpec of one parameter of a Gemma ``Transformer`` under TP (see module docstring)."""
    m = model_axis
    if m is None:
        return P()
    last = names[-1] if names else ""
    owner = names[-2] if len(names) >= 2 else ""
    if owner == "embedder" and last == "embedding":
        return P(m, None)                                  # vocab-sharded
    if owner in ("q_proj", "k_proj", "v_proj") and last == "w":
        return P(m, None, None)                            # heads
    if owner == "o_proj" and last == "w":                  # [N, H, D]
        return P(None, None, m) if mode == "gather" else P(m, None, None)
    if owner in ("gate", "up") and last == "kernel":
        return P(None, m)                                  # hidden
    if owner in ("gate", "up") and last == "bias":
        return P(m)
    if owner == "down" and last == "kernel":               # [F, D]
        return P(None, m) if mode == "gather" else P(m, None)
    if owner == "down" and last == "bias":
        return P(m) if mode == "gather" else P()
    return P(*([None] * ndim)) if ndim else P()


def _state_specs(state, mesh, mode):
    m = _ax(mesh, MODEL) if _size(mesh, MODEL) > 1 else None
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _param_spec(_path_names(path), jnp.ndim(leaf), m, mode), state)


class ParallelTransformer(nnx.Module):
    """A Gemma ``Transformer`` whose parameters are placed on a mesh; ``__call__``, ``init_cache``,
    ``prefill`` and ``decode_step`` have the ``Transformer`` signatures and run under ``jax.jit`` as
    one ``shard_map`` over the mesh (batch over ``'data'``, TP over ``'model'``).

    Build with ``tensor_parallel(model, mesh)`` / ``data_parallel(model, mesh)``; the batch must be
    divisible by the ``'data'`` size (``generate`` pads for you).
    """

    def __init__(self, inner, mesh: Mesh, mode: str, kv_repeat: int):
        kernel = getattr(inner.config, "attention_kernel", "triton")
        if kernel != "triton":
            raise NotImplementedError(
                f"detjax.parallel runs the Triton attention kernels; this model has "
                f"config.attention_kernel={kernel!r} (use attention_kernel='triton', or the "
                "single-device model)")
        self.inner = inner
        self.mesh = mesh
        self.mode = mode
        self.kv_repeat = kv_repeat
        self.config = inner.config
        self.impl = inner.impl

    # ---- specs -----------------------------------------------------------------------------
    @property
    def dp(self):
        return _size(self.mesh, DATA)

    @property
    def tp(self):
        return _size(self.mesh, MODEL)

    def _d(self):
        return _ax(self.mesh, DATA)

    def _m(self):
        return _ax(self.mesh, MODEL) if self.tp > 1 else None

    def _cache_specs(self, num_layers):
        kv = P(self._d(), None, self._m(), None)
        return {"k": [kv] * num_layers, "v": [kv] * num_layers, "lengths": P(self._d())}

    def _split(self):
        graphdef, state = nnx.split(self.inner)
        return graphdef, state, _state_specs(state, self.mesh, self.mode)

    def _smap(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    # ---- public (global view) ----------------------------------------------------------------
    def __call__(self, tokens, lengths=None):
        tokens = jnp.asarray(tokens, jnp.int32)
        graphdef, state, specs = self._split()
        d, m = self._d(), self._m()
        lp = _Local(self)
        if lengths is None:
            f = self._smap(lambda s, t: lp.forward(nnx.merge(graphdef, s), t, None),
                           (specs, P(d)), P(d, None, m))
            return f(state, tokens)
        f = self._smap(lambda s, t, l: lp.forward(nnx.merge(graphdef, s), t, l),
                       (specs, P(d), P(d)), P(d, None, m))
        return f(state, tokens, jnp.asarray(lengths, jnp.int32))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        c = self.config
        dt = jnp.dtype(dtype) if dtype is not None else c.activation_dtype
        shape = (batch, max_len, c.num_kv_heads * self.kv_repeat, c.head_dim)
        return {"k": [jnp.zeros(shape, dt) for _ in range(c.num_layers)],
                "v": [jnp.zeros(shape, dt) for _ in range(c.num_layers)],
                "lengths": jnp.zeros((batch,), jnp.int32)}

    def prefill(self, tokens, lengths, cache):
        tokens = jnp.asarray(tokens, jnp.int32)
        graphdef, state, specs = self._split()
        d, m = self._d(), self._m()
        cs = self._cache_specs(self.config.num_layers)
        lp = _Local(self)
        f = self._smap(lambda s, t, l, c: lp.prefill(nnx.merge(graphdef, s), t, l, c),
                       (specs, P(d), P(d), cs), (P(d, m), cs))
        return f(state, tokens, jnp.asarray(lengths, jnp.int32), cache)

    def decode_step(self, tokens, cache):
        tokens = jnp.asarray(tokens, jnp.int32)
        graphdef, state, specs = self._split()
        d, m = self._d(), self._m()
        cs = self._cache_specs(self.config.num_layers)
        lp = _Local(self)
        f = self._smap(lambda s, t, c: lp.decode_step(nnx.merge(graphdef, s), t, c),
                       (specs, P(d), cs), (P(d, None, m), cs))
        return f(state, tokens, cache)


class _Local:
    """The per-device computation (inside ``shard_map``) on a ``Transformer`` holding local
    parameter shards. Mirrors ``Transformer`` / ``Block`` / ``Attention`` step by step, replacing
    only the projections whose contraction TP would otherwise split."""

    def __init__(self, pm: ParallelTransformer):
        self.m = pm._m()           # model axis name or None (TP degree 1)
        self.mode = pm.mode
        self.cfg = pm.config

    # --- row-parallel projections: gather the input, shard the output dim ---------------------
    def _row_parallel(self, proj, y, axis):
        if self.m is None:
            return proj(y)
        if self.mode == "psum":   # negative control: contraction split over devices
            return jax.lax.psum(proj(y), self.m)
        full = jax.lax.all_gather(y, self.m, axis=axis % y.ndim, tiled=True)
        out = proj(full)
        return jax.lax.all_gather(out, self.m, axis=out.ndim - 1, tiled=True)

    def _embed(self, model, tokens):
        if self.m is None:
            return model._embed(tokens)
        return _vocab_sharded_embed(model, tokens, self.m, self.cfg)

    def _attn(self, attn, x, positions, lengths):
        q, k, v = attn._qkv(x, positions)
        o = _ops(attn.impl).attention(q, k, v, q_positions=positions, kv_lengths=lengths,
                                      **attn._opts())
        return self._row_parallel(attn.o_proj, o, axis=2), (k, v)

    def _attn_decode(self, attn, x, k_cache, v_cache, lengths):
        o, k_cache, v_cache = attn.decode_heads(x, k_cache, v_cache, lengths)
        return self._row_parallel(attn.o_proj, o, axis=2), k_cache, v_cache

    def _mlp(self, mlp, x):
        return self._row_parallel(mlp.down, geglu(mlp.gate(x), mlp.up(x), impl=mlp.impl),
                                  axis=-1)   # as FeedForward

    def _finish(self, layer, x, a):
        return layer._finish(x, a, mlp=lambda h: self._mlp(layer.mlp, h))

    def _block(self, layer, x, positions, lengths):
        a, kv = self._attn(layer.attn, layer.pre_attention_norm(x), positions, lengths)
        return self._finish(layer, x, a), kv

    # --- Transformer methods -------------------------------------------------------------------
    def forward(self, model, tokens, lengths):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(model, tokens)
        for layer in model.layers:
            x, _ = self._block(layer, x, positions, lengths)
        return model._logits(x)

    def prefill(self, model, tokens, lengths, cache):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(model, tokens)
        ks, vs = [], []
        for layer, kc, vc in zip(model.layers, cache["k"], cache["v"]):
            x, (k, v) = self._block(layer, x, positions, lengths)
            ks.append(jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), 0, axis=1))
            vs.append(jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), 0, axis=1))
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return model._logits(last), {"k": ks, "v": vs, "lengths": lengths}

    def decode_step(self, model, tokens, cache):
        lengths = cache["lengths"]
        x = self._embed(model, tokens)
        ks, vs = [], []
        for layer, kc, vc in zip(model.layers, cache["k"], cache["v"]):
            a, kc, vc = self._attn_decode(layer.attn, layer.pre_attention_norm(x), kc, vc, lengths)
            x = self._finish(layer, x, a)
            ks.append(kc)
            vs.append(vc)
        return model._logits(x), {"k": ks, "v": vs, "lengths": lengths + tokens.shape[1]}


def tensor_parallel(model, mesh: Mesh, *, mode: str = "gather",
                    allow_xla_autotuning: bool = False) -> ParallelTransformer:
    """Return ``model`` (a ``detjax.models.gemma.Transformer``) as a ``ParallelTransformer`` with its
    parameters placed by ``NamedSharding`` on ``mesh`` following the no-split-contraction rule
    (module docstring). ``mode='psum'``: Megatron-style split-K row-parallel projections with
    ``psum`` (negative control / benchmark baseline only; NOT deterministic across TP degrees).

    Requirements for a TP degree ``tp`` (the ``'model'`` axis size): ``tp`` divides ``num_heads``,
    ``hidden_dim``, ``d_model`` and ``vocab_size``, and ``num_kv_heads`` divides or is a multiple
    of ``tp`` (KV heads are repeated ``tp // num_kv_heads`` times when fewer than ``tp``).
    The input model is not modified.

    On GPU meshes (``tp > 1``, mode ``'gather'``) ``XLA_FLAGS`` must hold ``AUTOTUNE_FLAG``
    (``--xla_gpu_autotune_level=0``, set before jax starts), else this raises: XLA's fusion
    autotuner picks, by timing and so per process, between its native and its Triton block-level
    emitter for each fusion, and the two round elementwise code differently; on two H200s the TP
    gradients were then 1 ulp off one device in 3 of 3 processes, and equal in 4 of 4 with the flag
    (README, "Several devices"). ``allow_xla_autotuning=True`` accepts process-dependent bits
    and only warns.
    """
    if mode not in ("gather", "psum"):
        raise ValueError(f"mode must be 'gather' or 'psum'; got {mode!r}")
    c = model.config
    tp = _size(mesh, MODEL)
    for name, v in (("num_heads", c.num_heads), ("hidden_dim", c.hidden_dim),
                    ("d_model", c.d_model), ("vocab_size", c.vocab_size)):
        if v % tp:
            raise ValueError(f"TP degree {tp} must divide {name} ({v})")
    if c.num_kv_heads % tp and tp % c.num_kv_heads:
        raise ValueError(f"num_kv_heads ({c.num_kv_heads}) must divide or be a multiple of the TP "
                         f"degree ({tp})")
    r = max(1, tp // c.num_kv_heads)
    if tp > 1 and mode == "gather":
        _check_gpu_autotune(mesh, allow_xla_autotuning)
    graphdef, state = nnx.split(model)
    specs = _state_specs(state, mesh, mode)

    def place(path, leaf, spec):
        names = _path_names(path)
        if r > 1 and len(names) >= 2 and names[-2] in ("k_proj", "v_proj") and names[-1] == "w":
            leaf = jnp.repeat(leaf, r, axis=0)   # exact copies: KV head j -> heads j*r .. j*r+r-1
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    placed = jax.tree_util.tree_map_with_path(
        lambda p, leaf: place(p, leaf, _param_spec(_path_names(p), jnp.ndim(leaf),
                                                   _ax(mesh, MODEL) if tp > 1 else None, mode)),
        state)
    del specs
    return ParallelTransformer(nnx.merge(graphdef, placed), mesh, mode, r)


AUTOTUNE_FLAG = "--xla_gpu_autotune_level=0"


def _check_gpu_autotune(mesh: Mesh, allow: bool):
    """Raise (or, with ``allow``, warn once per process) for a GPU mesh when ``XLA_FLAGS`` lacks
    ``AUTOTUNE_FLAG``; CPU meshes pass (see ``tensor_parallel``)."""
    if all(d.platform != "gpu" for d in mesh.devices.flat):   # jax's platform name for CUDA/ROCm
        return
    if AUTOTUNE_FLAG.lstrip("-") in os.environ.get("XLA_FLAGS", ""):
        return
    msg = ("tensor parallelism on GPUs needs XLA_FLAGS to hold "
           f"{AUTOTUNE_FLAG} (set before jax starts): XLA's fusion autotuner otherwise picks a "
           "code generator per fusion by timing, so the TP bits change from one process to the "
           "next (1 ulp off one device in 3 of 3 processes on two H200s; README, 'Several "
           "devices')")
    if not allow:
        raise RuntimeError(f"detjax.parallel: {msg}. Pass allow_xla_autotuning=True to accept "
                           "process-dependent bits.")
    warnings.warn(f"detjax.parallel: allow_xla_autotuning=True: {msg}.", RuntimeWarning,
                  stacklevel=3)


def data_parallel(model, mesh: Mesh) -> ParallelTransformer:
    """``model`` replicated on ``mesh``, batch over ``'data'`` (any ``'model'`` axis must be 1)."""
    if _size(mesh, MODEL) != 1:
        raise ValueError("data_parallel needs a mesh whose 'model' axis is 1; use "
                         "tensor_parallel for TP (it shards the batch over 'data' too)")
    return tensor_parallel(model, mesh)


@nnx.jit
def _forward_jit(pmodel, tokens):
    return pmodel(tokens)


@nnx.jit
def _forward_jit_len(pmodel, tokens, lengths):
    return pmodel(tokens, lengths)


def forward(pmodel: ParallelTransformer, tokens, lengths=None):
    """Jitted logits ``[B, T, vocab]`` of a ``ParallelTransformer`` (tokens placed with
    ``shard_batch``); the output is sharded ``P('data', None, 'model')``."""
    tokens = shard_batch(pmodel.mesh, jnp.asarray(tokens, jnp.int32))
    if lengths is None:
        return _forward_jit(pmodel, tokens)
    return _forward_jit_len(pmodel, tokens, shard_batch(pmodel.mesh, jnp.asarray(lengths)))


def generate(pmodel: ParallelTransformer, prompts, max_new_tokens, *, sequence_ids=None,
             **kw) -> GenerationResult:
    """``detjax.generate`` on a ``ParallelTransformer``. The prompts are padded to a multiple of
    the DP degree with copies of the last prompt (same sequence id: same stopping behaviour), and
    the copies dropped. Tokens and logprobs equal the single-device ``detjax.generate`` bitwise."""
    n = len(prompts)
    if sequence_ids is None:
        sequence_ids = list(range(n))
    sequence_ids = list(sequence_ids)
    pad = (-n) % pmodel.dp
    prompts = list(prompts) + [prompts[-1]] * pad
    sequence_ids = sequence_ids + [sequence_ids[-1]] * pad
    out = _generate(pmodel, prompts, max_new_tokens, sequence_ids=sequence_ids, **kw)
    return GenerationResult(out.tokens[:n], out.logprobs[:n])


# ---------------------------------------------------------------------------------------------
# Data-parallel training step with the deterministic gradient reduction

def _block_loss(graphdef, params, rest, tokens):
    """Summed next-token cross-entropy over one block ``[m, T]`` (detjax fixed-order sums)."""
    model = nnx.merge(graphdef, params, rest)
    o = _ops(model.impl)
    logits = model(tokens[:, :-1])                                   # [m, T-1, V]
    lp = o.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return o.sum(nll.reshape(1, -1), axis=-1)[0]


def dp_value_and_grad(model, tokens, mesh: Mesh, *, block_size: int = 1):
    """Loss and parameter gradients of the summed next-token cross-entropy of ``tokens [B, T]``
    under data parallelism, bitwise independent of the DP degree and run-to-run reproducible.

    The batch is cut into blocks of ``block_size`` consecutive examples; each device computes the
    loss and gradient of each of its blocks (``vmap`` over blocks, detjax fixed-order backward);
    losses and gradients are then gathered in global block order and summed sequentially in
    ascending block order (``deterministic_allreduce_sum(..., blocks=True)``). The DP degree must
    divide ``B / block_size``. Returns ``(loss, grads)`` with ``grads`` an ``nnx.State`` of the
    model's ``nnx.Param`` s, replicated.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b = tokens.shape[0]
    dp = _size(mesh, DATA)
    if b % block_size or (b // block_size) % dp:
        raise ValueError(f"batch {b} must be a multiple of block_size ({block_size}) x DP degree "
                         f"({dp})")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _dp_vg(graphdef, params, rest, shard_batch(mesh, tokens), mesh, block_size)


def _dp_vg(graphdef, params, rest, tokens, mesh, block_size):
    # placed explicitly (a no-op for a ParallelTransformer's parameters), so that the call from
    # ``tp_value_and_grad`` at TP degree 1 hits this jitted function's cache
    params, rest = replicate(mesh, params), replicate(mesh, rest)
    return _dp_vg_fn(graphdef, mesh, block_size)(params, rest, tokens)


@functools.lru_cache(maxsize=32)
def _dp_vg_fn(graphdef, mesh, block_size):
    d = _ax(mesh, DATA)

    def local(params, rest, tokens):
        blocks = tokens.reshape(-1, block_size, tokens.shape[-1])
        vg = jax.value_and_grad(lambda p, t: _block_loss(graphdef, p, rest, t))
        losses, grads = jax.vmap(vg, in_axes=(None, 0))(params, blocks)
        if d is None:
            return ordered_sum(losses), jax.tree.map(ordered_sum, grads)
        return (deterministic_allreduce_sum(losses, d, blocks=True),
                deterministic_allreduce_sum(grads, d, blocks=True))

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(d)), out_specs=(P(), P()),
                      check_vma=False)
    return jax.jit(f)


def dp_train_step(model, tokens, mesh: Mesh, *, lr: float = 1e-2, block_size: int = 1):
    """One SGD step ``p - lr * g`` with ``dp_value_and_grad``; returns ``(loss, grads, new_model)``
    (the update is elementwise, so the new parameters are as reproducible as the gradients)."""
    loss, grads = dp_value_and_grad(model, tokens, mesh, block_size=block_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    def sgd(p, g):
        return jax.tree.map(lambda a, b: a - jnp.asarray(lr, a.dtype) * b.astype(a.dtype), p, g)

    new = jax.jit(sgd)(params, grads)
    return loss, grads, nnx.merge(graphdef, new, rest)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel (and DP x TP) training: loss and gradients bitwise equal to one device
#
# Under TP every device computes the replicated parts (norms, residual stream, loss) redundantly,
# so each holds the *whole* loss. Differentiating that local replica with plain autodiff would be
# wrong twice over: the transpose of ``all_gather`` is a reduce-scatter (float sum over devices, in
# the collective library's order), and the input gradient of a sharded projection contracts the
# sharded dimension (Megatron all-reduces it). Instead, every point where the single-device
# backward contracts or reduces over a sharded dimension is a ``custom_vjp`` whose backward gathers
# the operands and runs the single-device computation on them:
#
# * ``_gather_rep`` (activation all-gather): the cotangent downstream is replicated (identical on
#   every device), so the cotangent of the local block is its slice: a copy, never a sum.
# * ``_split_grad`` (projection with a sharded weight; RMSNorm of sharded heads with a shared
#   scale): the gradient of the sharded operand is local (weight gradients contract tokens, which
#   no device splits); the gradient of the shared operand (the replicated input of a projection,
#   the norm scale) is the vjp of the *same op on the gathered operands* (weight / heads and the
#   output cotangent gathered, repeated KV heads de-duplicated): the single-device call itself,
#   computed redundantly on every device.
# * ``_group_attention`` (TP degree above ``num_kv_heads``: a KV head's query group spans ``r``
#   devices): the backward gathers the group's queries and output cotangents and runs the
#   single-device attention backward of the whole group, so dK/dV (summed over the group inside
#   the kernel) come out whole and identical on the ``r`` devices holding copies of the KV head.
# * ``_owner_rows`` (embedding lookup): each device looks its own tokens up
#   (``ops.embedding_lookup`` of the local rows, other tokens out of range: no gradient), the
#   owner's row is copied to every device; backward: each device keeps the cotangent of its own
#   tokens. ``embedding_lookup``'s gradient sums each id's cotangents by a tree over the id's own
#   occurrences, so a vocabulary shard gets bitwise the single-device rows (XLA's scatter-add used
#   atomics on the GPU and changed run to run).

def _gather(x, axis_name, axis):
    return jax.lax.all_gather(x, axis_name, axis=axis % x.ndim, tiled=True)


def _dedupe(x, axis, r):
    """Every ``r``-th slice along ``axis``: undoes ``jnp.repeat(., r, axis)`` (exact copies)."""
    return x if r == 1 else jax.lax.slice_in_dim(x, 0, x.shape[axis], stride=r, axis=axis % x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_rep_p(x, axis_name, axis):
    return _gather(x, axis_name, axis)


def _gather_rep_fwd(x, axis_name, axis):
    return _gather(x, axis_name, axis), None


def _gather_rep_bwd(axis_name, axis, _, g):
    n = g.shape[axis] // jax.lax.axis_size(axis_name)
    return (jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index(axis_name) * n, n, axis),)


_gather_rep_p.defvjp(_gather_rep_fwd, _gather_rep_bwd)


def _gather_rep(x, axis_name, axis):
    """``all_gather`` (tiled) of ``x`` along ``axis`` for a replicated downstream computation:
    the cotangent of ``x`` is the local slice of the (identical) cotangent of the result."""
    return _gather_rep_p(x, axis_name, axis % x.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _split_grad(f, full, sharded, shared, aux):
    return f(sharded, shared, aux)


def _split_grad_fwd(f, full, sharded, shared, aux):
    y, vjp_local = jax.vjp(lambda s: f(s, shared, aux), sharded)
    return y, (vjp_local, sharded, shared, aux)


def _split_grad_bwd(f, full, res, dy):
    vjp_local, sharded, shared, aux = res
    (ds,) = vjp_local(dy)
    s_full, dy_full = full(sharded, dy)
    _, vjp_h = jax.vjp(lambda h: f(s_full, h, aux), shared)
    (dh,) = vjp_h(dy_full)
    return ds, dh, jax.tree.map(lambda a: None, aux)


_split_grad.defvjp(_split_grad_fwd, _split_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _split_grad_psum(f, axis_name, sharded, shared, aux):
    return f(sharded, shared, aux)


def _split_grad_psum_fwd(f, axis_name, sharded, shared, aux):
    return f(sharded, shared, aux), (sharded, shared, aux)


def _split_grad_psum_bwd(f, axis_name, res, dy):
    """Megatron's backward: local partial of the shared operand's gradient, then ``psum``
    (split contraction, the collective's order): the negative control."""
    sharded, shared, aux = res
    _, vjp = jax.vjp(lambda s, h: f(s, h, aux), sharded, shared)
    ds, dh = vjp(dy)
    return ds, jax.lax.psum(dh, axis_name), jax.tree.map(lambda a: None, aux)


_split_grad_psum.defvjp(_split_grad_psum_fwd, _split_grad_psum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _group_attention(f, axis_name, group, q, kv, aux):
    return f(q, kv, aux)


def _group_attention_fwd(f, axis_name, group, q, kv, aux):
    return f(q, kv, aux), (q, kv, aux)


def _group_attention_bwd(f, axis_name, group, res, do):
    q, kv, aux = res
    nl = q.shape[2]                                   # local query heads
    r, g = group                                      # devices per KV head, query heads per group
    idx = jax.lax.axis_index(axis_name)

    def grp(a):                                       # this KV head's whole query group
        return jax.lax.dynamic_slice_in_dim(_gather(a, axis_name, 2), (idx // r) * g, g, 2)

    _, vjp = jax.vjp(lambda q_, kv_: f(q_, kv_, aux), grp(q), kv)
    dq, dkv = vjp(grp(do))
    dq = jax.lax.dynamic_slice_in_dim(dq, (idx % r) * nl, nl, 2)
    return dq, dkv, jax.tree.map(lambda a: None, aux)


_group_attention.defvjp(_group_attention_fwd, _group_attention_bwd)


def _vocab_sharded_embed(model, tokens, axis_name, cfg):
    """The embedding of ``tokens`` from a vocabulary-sharded table: each device looks up the tokens
    it owns (``ops.embedding_lookup``: the others are out of range, NaN rows with no gradient), and
    the owner's row is copied to every device (``_owner_rows``)."""
    emb = model.embedder
    e = emb.embedding[...]                                              # [V / tp, D]
    vl = e.shape[0]
    local = tokens - jax.lax.axis_index(axis_name) * vl
    local = jnp.where((local >= 0) & (local < vl), local, vl)
    y = _dt(_owner_rows(axis_name, embedding_lookup(e, local), tokens // vl), emb.dtype)
    if cfg.embed_scale_by_sqrt_dim:
        y = scale_embedding(y, cfg.d_model, model.impl)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _owner_rows(axis_name, rows, owner):
    every = jax.lax.all_gather(rows, axis_name, axis=0)                 # [tp, B, T, D]
    return jnp.take_along_axis(every, owner[None, ..., None], axis=0)[0]


def _owner_rows_fwd(axis_name, rows, owner):
    return _owner_rows(axis_name, rows, owner), owner


def _owner_rows_bwd(axis_name, owner, g):
    mine = (owner == jax.lax.axis_index(axis_name))[..., None]
    return jnp.where(mine, g, jnp.zeros_like(g)), None


_owner_rows.defvjp(_owner_rows_fwd, _owner_rows_bwd)


def _einsum_f(mod):
    eq, dtype, impl = mod.equation, mod.dtype, mod.impl

    def f(w, x, aux):
        dt = _compute_dtype(x, w, dtype)
        return _ops(impl).einsum(eq, x.astype(dt), w.astype(dt))
    return f


def _linear_f(mod):
    if mod.bias is not None:
        raise NotImplementedError("TP training of Linear layers with a bias")
    dtype, impl = mod.dtype, mod.impl

    def f(w, x, aux):
        dt = _compute_dtype(x, w, dtype)
        return _ops(impl).matmul(x.astype(dt), w.astype(dt))
    return f


def _attend_f(emb):
    dtype, impl = emb.dtype, emb.impl

    def f(e, x, aux):
        dt = _compute_dtype(x, e, dtype)
        return _ops(impl).dot_general(x.astype(dt), e.astype(dt),
                                      (((x.ndim - 1,), (1,)), ((), ())))
    return f


def _norm_f(mod):
    dtype, impl, eps = mod.dtype, mod.impl, mod.eps

    def f(x, scale, aux):
        return _ops(impl).rms_norm(_dt(x, dtype), scale, eps=eps, offset=1.0)
    return f


class _LocalTrain(_Local):
    """The per-device *differentiable* TP forward (``mode='gather'``): ``_Local`` with every
    collective and every shared-operand gradient behind the custom VJPs above, and the loss
    computed on the gathered (replicated) logits. Mirrors ``Transformer.__call__`` op for op, so
    that the backward is the single-device backward (same ops, same operands, same cotangent
    accumulation order)."""

    def __init__(self, m, cfg, r, grad_reduce):
        self.m, self.mode, self.cfg, self.r = m, "gather", cfg, r
        self.grad_reduce = grad_reduce

    def _sharded(self, f, w, x, w_axis, y_axis, r=1):
        """``f(w, x)`` with ``w`` sharded along ``w_axis`` (the output along ``y_axis``)."""
        m = self.m
        if self.grad_reduce == "psum":
            return _split_grad_psum(f, m, w, x, ())

        def full(w_, dy):
            return (_dedupe(_gather(w_, m, w_axis), w_axis, r),
                    _dedupe(_gather(dy, m, y_axis), y_axis, r))
        return _split_grad(f, full, w, x, ())

    def _proj(self, mod, x, w_axis, y_axis, r=1):
        return self._sharded(_einsum_f(mod), mod.w[...], x, w_axis, y_axis, r)

    def _head_norm(self, norm, x, r=1):
        """RMSNorm over ``head_dim`` of local heads ``[B, T, n, H]``; its scale is shared by all
        heads, so the scale gradient reduces over every head: computed on the gathered heads."""
        m = self.m

        def full(x_, dy):
            return (_dedupe(_gather(x_, m, 2), 2, r), _dedupe(_gather(dy, m, 2), 2, r))
        return _split_grad(_norm_f(norm), full, x, norm.scale[...], ())

    def _qkv(self, attn, x, positions):
        r = self.r
        q = self._proj(attn.q_proj, x, 0, 2)
        k = self._proj(attn.k_proj, x, 0, 2, r)
        v = self._proj(attn.v_proj, x, 0, 2, r)
        if attn.q_norm is not None:
            q, k = self._head_norm(attn.q_norm, q), self._head_norm(attn.k_norm, k, r)
        return (*attn.rope_qk(q, k, positions), v)

    def _attn(self, attn, x, positions, lengths):
        if self.m is None:
            return super()._attn(attn, x, positions, lengths)
        q, k, v = self._qkv(attn, x, positions)
        opts = attn._opts()
        impl = attn.impl

        def f(q_, kv, aux):
            return _ops(impl).attention(q_, kv[0], kv[1], q_positions=aux[0], kv_lengths=aux[1],
                                        **opts)
        if lengths is None:
            lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
        if self.r > 1:    # one KV head (a copy) per device; its query group spans r devices
            o = _group_attention(f, self.m, (self.r, self.cfg.num_heads // self.cfg.num_kv_heads),
                                 q, (k, v), (positions, lengths))
        else:
            o = f(q, (k, v), (positions, lengths))
        o = _gather_rep(o, self.m, 2)                                         # all heads
        y = self._proj(attn.o_proj, o, 2, -1)                                 # d_model-sharded
        return _gather_rep(y, self.m, -1), (k, v)

    def _mlp(self, mlp, x):
        if self.m is None:
            return mlp(x)
        lin = _linear_f
        g = self._sharded(lin(mlp.gate), mlp.gate.kernel[...], x, 1, -1)
        u = self._sharded(lin(mlp.up), mlp.up.kernel[...], x, 1, -1)
        h = _gather_rep(geglu(g, u, impl=mlp.impl), self.m, -1)
        y = self._sharded(lin(mlp.down), mlp.down.kernel[...], h, 1, -1)
        return _gather_rep(y, self.m, -1)

    def logits(self, model, tokens):
        """Full (gathered, replicated) logits ``[B, T, vocab]`` of ``Transformer.__call__``."""
        if self.m is None:
            return model(tokens)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(model, tokens)
        for layer in model.layers:
            x, _ = self._block(layer, x, positions, None)
        x = model.final_norm(x)
        emb = model.embedder
        logits = self._sharded(_attend_f(emb), emb.embedding[...], x, 0, -1)
        logits = final_logits(logits, self.cfg.final_logits_soft_cap, model.impl)
        return _gather_rep(logits, self.m, -1)

    def block_loss(self, model, tokens):
        """``_block_loss`` on the TP-local model."""
        o = _ops(model.impl)
        logits = self.logits(model, tokens[:, :-1])
        lp = o.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
        return o.sum(nll.reshape(1, -1), axis=-1)[0]


def _spec_key(specs):
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=32)
def _tp_vg_fn(graphdef, mesh, cfg, r, block_size, grad_reduce, pkey, rkey):
    d = _ax(mesh, DATA)
    m = _ax(mesh, MODEL) if _size(mesh, MODEL) > 1 else None
    pspecs, rspecs = pkey[0].unflatten(pkey[1]), rkey[0].unflatten(rkey[1])
    lp = _LocalTrain(m, cfg, r, grad_reduce)

    def loss(params, rest, tokens):
        return lp.block_loss(nnx.merge(graphdef, params, rest), tokens)

    def local(params, rest, tokens):
        blocks = tokens.reshape(-1, block_size, tokens.shape[-1])
        losses, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, None, 0))(
            params, rest, blocks)
        return (deterministic_allreduce_sum(losses, d, blocks=True),
                deterministic_allreduce_sum(grads, d, blocks=True))

    f = jax.shard_map(local, mesh=mesh, in_specs=(pspecs, rspecs, P(d)),
                      out_specs=(P(), pspecs), check_vma=False)
    return jax.jit(f)


def _tp_split(pmodel, tokens, block_size, grad_reduce):
    """Checks; ``(fn, graphdef, params, rest, tokens)`` with ``fn(params, rest, tokens)`` ->
    ``(loss, grads in pmodel's layout)``. TP degree 1 is data parallelism: ``dp_value_and_grad``'s
    program (the same jitted function)."""
    if not isinstance(pmodel, ParallelTransformer):
        raise TypeError("expected a ParallelTransformer (tensor_parallel(model, mesh))")
    if pmodel.mode != "gather":
        raise ValueError("TP training needs a mode='gather' ParallelTransformer")
    if grad_reduce not in ("gather", "psum"):
        raise ValueError(f"grad_reduce must be 'gather' or 'psum'; got {grad_reduce!r}")
    if grad_reduce == "psum" and pmodel.kv_repeat > 1:
        raise ValueError("grad_reduce='psum' (negative control) needs TP <= num_kv_heads")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, seq >= 2]; got shape {tuple(tokens.shape)}")
    b = tokens.shape[0]
    if b % block_size or (b // block_size) % pmodel.dp:
        raise ValueError(f"batch {b} must be a multiple of block_size ({block_size}) x DP degree "
                         f"({pmodel.dp})")
    graphdef, params, rest = nnx.split(pmodel.inner, nnx.Param, ...)
    mesh = pmodel.mesh
    toks = shard_batch(mesh, tokens)
    if pmodel.tp == 1:
        def fn(p, r, t):
            return _dp_vg(graphdef, p, r, t, mesh, block_size)
        return fn, graphdef, params, rest, toks
    jf = _tp_vg_fn(graphdef, mesh, pmodel.config, pmodel.kv_repeat, block_size, grad_reduce,
                   _spec_key(_state_specs(params, mesh, "gather")),
                   _spec_key(_state_specs(rest, mesh, "gather")))

    def fn(p, r, t):
        return _executable(jf, p, r, t)(p, r, t)
    fn.executable = lambda p, r, t: _executable(jf, p, r, t)
    return fn, graphdef, params, rest, toks


_EXECUTABLES: dict = {}


def _executable(jf, *args):
    """``jf.lower(*args).compile()``, cached (so the HLO text of the program that ran can be
    inspected without compiling it again)."""
    leaves = jax.tree.leaves(args)
    key = (jf, jax.tree.structure(args),
           tuple((a.shape, a.dtype, a.sharding) for a in leaves))
    ex = _EXECUTABLES.get(key)
    if ex is None:
        if len(_EXECUTABLES) >= 16:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        ex = _EXECUTABLES[key] = jf.lower(*args).compile()
    return ex


def tp_grad_hlo(pmodel: ParallelTransformer, tokens, *, block_size: int = 1,
                grad_reduce: str = "gather") -> str:
    """Compiled HLO text of ``tp_value_and_grad``'s program (the cached executable that runs;
    TP degree > 1), e.g. for ``assert_no_float_allreduce``."""
    fn, _, params, rest, toks = _tp_split(pmodel, tokens, block_size, grad_reduce)
    if pmodel.tp == 1:
        raise ValueError("TP degree 1 runs dp_value_and_grad's jitted program; lower it instead")
    return fn.executable(params, rest, toks).as_text()


def _single_layout(state, r):
    """Parameters / gradients of a ``ParallelTransformer`` in the single-device layout (the
    repeated KV heads of ``k_proj`` / ``v_proj`` de-duplicated)."""
    def one(path, a):
        names = _path_names(path)
        if r > 1 and len(names) >= 2 and names[-2] in ("k_proj", "v_proj") and names[-1] == "w":
            return a[::r]
        return a
    return jax.tree_util.tree_map_with_path(one, state)


def tp_value_and_grad(pmodel: ParallelTransformer, tokens, *, block_size: int = 1,
                      grad_reduce: str = "gather"):
    """Loss and parameter gradients of the summed next-token cross-entropy of ``tokens [B, T]``
    under tensor parallelism (and DP x TP: ``pmodel``'s mesh may have a ``'data'`` axis > 1),
    bitwise equal to ``dp_value_and_grad(model, tokens, make_mesh(1, 1), block_size=...)`` on one
    device for every TP and DP degree.

    ``pmodel`` = ``tensor_parallel(model, mesh)`` (mode ``'gather'``). Blocks of ``block_size``
    examples are spread over ``'data'`` as in ``dp_value_and_grad``; within a block the forward is
    the TP forward, and the backward keeps every contraction on one device (the gradient of a
    sharded weight is computed locally; every reduction over a sharded dimension - a projection's
    input gradient, a norm scale shared by heads, dK/dV of a split GQA group, the embedding
    scatter-add - gathers its operands and runs the single-device op: module comment above
    ``_gather_rep``). The compiled program contains no float all-reduce / reduce-scatter.
    Cost of that choice: per layer, the backward all-gathers the layer's weights and computes
    input gradients redundantly on every TP device (like the replicated norms and residual stream).

    ``grad_reduce='psum'``: Megatron's backward (projection input gradients as local partials +
    ``psum``); NOT deterministic across TP degrees: the negative control (needs TP <=
    ``num_kv_heads``).

    Returns ``(loss, grads)``; ``grads`` is an ``nnx.State`` of the ``nnx.Param`` s in the
    single-device layout (use ``tp_train_step`` to update a ``ParallelTransformer``).
    """
    fn, _, params, rest, toks = _tp_split(pmodel, tokens, block_size, grad_reduce)
    loss, grads = fn(params, rest, toks)
    return loss, _single_layout(grads, pmodel.kv_repeat)


def tp_train_step(pmodel: ParallelTransformer, tokens, *, lr: float = 1e-2, block_size: int = 1):
    """One SGD step ``p - lr * g`` of a ``ParallelTransformer`` with the ``tp_value_and_grad``
    gradients; returns ``(loss, grads, new_pmodel)`` (``grads`` in the single-device layout;
    ``new_pmodel`` keeps the placement, and its ``unshard`` equals the parameters of
    ``dp_train_step`` on one device bitwise)."""
    fn, graphdef, params, rest, toks = _tp_split(pmodel, tokens, block_size, "gather")
    loss, grads = fn(params, rest, toks)

    def sgd(p, g):
        return jax.tree.map(lambda a, b: a - jnp.asarray(lr, a.dtype) * b.astype(a.dtype), p, g)

    # the new parameters keep the placement exactly (the next step reuses the same executable)
    new = jax.jit(sgd, out_shardings=jax.tree.map(lambda a: a.sharding, params))(params, grads)
    new_pm = ParallelTransformer(nnx.merge(graphdef, new, rest), pmodel.mesh, pmodel.mode,
                                 pmodel.kv_repeat)
    return loss, _single_layout(grads, pmodel.kv_repeat), new_pm


def unshard(pmodel: ParallelTransformer):
    """The single-device ``Transformer`` of a ``ParallelTransformer`` (parameters copied to the
    default device, repeated KV heads removed): ``unshard(tensor_parallel(model, mesh))`` has the
    parameters of ``model``."""
    graphdef, params, rest = nnx.split(pmodel.inner, nnx.Param, ...)
    params = _single_layout(jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params),
                            pmodel.kv_repeat)
    rest = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), rest)
    return nnx.merge(graphdef, params, rest)
