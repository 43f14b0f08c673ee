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
* **Generation**: ``generate(pmodel, prompts, ...)`` runs ``detjax.generate`` on the parallel
  model (its ``prefill`` / ``decode_step`` are ``shard_map``-ped); under DP the prompts are padded to
  a multiple of the DP degree with copies of the last prompt (rows are independent), and the copies
  are dropped.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from detjax.generate import GenerationResult
from detjax.generate import generate as _generate
from detjax.nn._impl import ops as _ops

__all__ = ["DATA", "MODEL", "make_mesh", "shard_batch", "replicate", "tensor_parallel",
           "data_parallel", "ParallelTransformer", "forward", "generate", "ordered_sum",
           "deterministic_allreduce_sum", "dp_value_and_grad", "dp_train_step",
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
        emb = model.embedder
        e = emb.embedding[...]                                      # [V / tp, D]
        vl = e.shape[0]
        local = tokens - jax.lax.axis_index(self.m) * vl
        rows = jnp.take(e, jnp.clip(local, 0, vl - 1), axis=0)      # [B, T, D]
        every = jax.lax.all_gather(rows, self.m, axis=0)            # [tp, B, T, D]
        owner = (tokens // vl)[None, ..., None]
        y = jnp.take_along_axis(every, owner, axis=0)[0]            # the owner's row: a copy
        if emb.dtype is not None:
            y = y.astype(emb.dtype)
        if self.cfg.embed_scale_by_sqrt_dim:
            y = y * jnp.asarray(math.sqrt(self.cfg.d_model), y.dtype)
        return y

    def _attn(self, attn, x, positions, lengths):
        q, k, v = attn._qkv(x, positions)
        o = _ops(attn.impl).attention(q, k, v, q_positions=positions, kv_lengths=lengths,
                                      **attn._opts())
        return self._row_parallel(attn.o_proj, o, axis=2), (k, v)

    def _attn_decode(self, attn, x, k_cache, v_cache, lengths):
        t = x.shape[1]
        positions = lengths[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
        q, k, v = attn._qkv(x, positions)
        upd = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=0))
        k_cache = upd(k_cache, k.astype(k_cache.dtype), lengths)
        v_cache = upd(v_cache, v.astype(v_cache.dtype), lengths)
        o = _ops(attn.impl).decode_attention(q, k_cache, v_cache, lengths + t, **attn._opts())
        return self._row_parallel(attn.o_proj, o, axis=2), k_cache, v_cache

    def _mlp(self, mlp, x):
        h = jax.nn.gelu(mlp.gate(x), approximate=True) * mlp.up(x)
        return self._row_parallel(mlp.down, h, axis=-1)

    def _finish(self, layer, x, a):
        if layer.post_attention_norm is not None:
            a = layer.post_attention_norm(a)
        x = x + a
        h = self._mlp(layer.mlp, layer.pre_ffw_norm(x))
        if layer.post_ffw_norm is not None:
            h = layer.post_ffw_norm(h)
        return x + h

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


def tensor_parallel(model, mesh: Mesh, *, mode: str = "gather") -> ParallelTransformer:
    """Return ``model`` (a ``detjax.models.gemma.Transformer``) as a ``ParallelTransformer`` with its
    parameters placed by ``NamedSharding`` on ``mesh`` following the no-split-contraction rule
    (module docstring). ``mode='psum'``: Megatron-style split-K row-parallel projections with
    ``psum`` (negative control / benchmark baseline only; NOT deterministic across TP degrees).

    Requirements for a TP degree ``tp`` (the ``'model'`` axis size): ``tp`` divides ``num_heads``,
    ``hidden_dim``, ``d_model`` and ``vocab_size``, and ``num_kv_heads`` divides or is a multiple
    of ``tp`` (KV heads are repeated ``tp // num_kv_heads`` times when fewer than ``tp``).
    The input model is not modified.
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
