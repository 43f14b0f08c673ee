"""Batch-invariant KV-cache generation for ``detjax.models.Transformer``.

``generate(model, prompts, max_new_tokens, ...)`` right-pads the ragged prompts into one batch,
prefills them with per-row lengths, then decodes one token per step inside a single jitted
``lax.while_loop`` (no host sync per token). Each row's tokens and log-probabilities depend only on
its own prompt, ``seed``, its sequence id and the step: never on the other prompts, their lengths,
the batch size, or the cache's ``max_len``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detjax.nn._impl import ops as _ops

__all__ = ["generate", "GenerationResult"]


@dataclasses.dataclass
class GenerationResult:
    """``tokens[i]`` / ``logprobs[i]``: numpy arrays (int32 / float32) of the tokens generated for
    ``prompts[i]`` and their log-probabilities, ending at the first stop token (included) or after
    ``max_new_tokens``. ``logprobs`` are ``log_softmax`` of the model's float32 logits row, i.e. of
    the *unmodified* distribution (before temperature, top-k and top-p)."""

    tokens: list
    logprobs: list

    def __len__(self):
        return len(self.tokens)


#: Positions are int32 in the compiled program: no cache may be longer.
MAX_LEN_LIMIT = 2**31 - 1


def _check_int(name, v, lo=None, allow_none=False, hi=None):
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {v!r}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}; got {v}")
    return v


def _check_prompts(prompts, vocab):
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError("prompts must be a list of lists of int token ids")
    if len(prompts) == 0:
        raise ValueError("prompts must contain at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise TypeError(f"prompts[{i}] must be a list of int token ids; got a string")
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a flat list of token ids; got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            raise TypeError(f"prompts[{i}] must contain ints; got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab}): "
                             f"min {arr.min()}, max {arr.max()}")
        out.append(arr.astype(np.int32))
    return out


def _sample_row(logits, key, temperature, top_k, top_p, impl):
    """One row ``[V]`` f32 -> token id (int32). Gumbel-max over ``logits / temperature`` restricted
    to the top-k (``lax.top_k``, exact) and then the top-p nucleus (fixed-order cumsum)."""
    o = _ops(impl)
    v = logits.shape[-1]
    k = v if top_k is None else min(top_k, v)
    if top_k is None and top_p is None:
        vals, idx = logits, None
    else:
        vals, idx = jax.lax.top_k(logits, k)      # sorted descending, ties by lower index
    scaled = vals / temperature
    if top_p is not None:
        probs = o.softmax(scaled[None, :], axis=-1)[0]
        cum = o.cumsum(probs[None, :], axis=-1)[0]
        keep = (cum - probs) < top_p               # exclusive cumsum: the top token is always kept
        scaled = jnp.where(keep, scaled, -jnp.inf)
    g = jax.random.gumbel(key, scaled.shape, jnp.float32)
    j = o.argmax((scaled + g)[None, :], axis=-1)[0]
    return (j if idx is None else idx[j]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "greedy",
                                             "top_k", "top_p", "impl"))
def _generate_jit(state, tokens, lengths, seq_ids, seed, temperature, stops, *, graphdef,
                  max_new_tokens, max_len, greedy, top_k, top_p, impl):
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    o = _ops(impl)
    base = jax.random.PRNGKey(seed)
    row_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(seq_ids)

    def choose(logits, step):
        logits = logits.astype(jnp.float32)
        lp_all = o.log_softmax(logits, axis=-1)
        if greedy:
            tok = o.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            tok = jax.vmap(lambda l, k: _sample_row(l, k, temperature, top_k, top_p, impl))(
                logits, keys)
        lp = jnp.take_along_axis(lp_all, tok[:, None], axis=-1)[:, 0]
        return tok, lp

    cache = model.init_cache(b, max_len)
    logits, cache = model.prefill(tokens, lengths, cache)
    tok, lp = choose(logits, 0)
    out_t = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    out_l = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, stops)

    def cond(c):
        step, _, _, _, _, done = c
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(c):
        step, tok, cache, out_t, out_l, done = c
        logits, cache = model.decode_step(tok[:, None], cache)
        tok, lp = choose(logits[:, 0], step)
        out_t = jax.lax.dynamic_update_slice_in_dim(out_t, tok[:, None], step, axis=1)
        out_l = jax.lax.dynamic_update_slice_in_dim(out_l, lp[:, None], step, axis=1)
        done = done | jnp.isin(tok, stops)
        return step + 1, tok, cache, out_t, out_l, done

    step, _, _, out_t, out_l, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, cache, out_t, out_l, done))
    return out_t, out_l, step


def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_tokens=(), max_len=None, sequence_ids=None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each of the ragged ``prompts``.

    Args:
      model: a ``detjax.models.Transformer`` (anything with ``config``, ``init_cache``,
        ``prefill`` and ``decode_step``).
      prompts: list of lists of int token ids (different lengths allowed, each non-empty).
      max_new_tokens: >= 1.
      temperature: 0 = greedy (``detjax.ops.argmax``, first maximum wins); > 0 = sampling.
      top_k: keep the ``top_k`` largest logits (``lax.top_k``, exact; ties by lower id).
      top_p: nucleus in (0, 1]: keep the smallest prefix of the sorted distribution (after
        temperature and top-k) whose probability reaches ``top_p`` (detjax fixed-order cumsum).
      seed: int in ``[-2**31, 2**32)``. Row ``i`` draws at step ``s`` with
        ``fold_in(fold_in(PRNGKey(seed), sequence_ids[i]), s)`` (gumbel-max), so its samples do not
        depend on the rest of the batch.
      stop_tokens: token ids ending a sequence (the stop token is included in the output).
      max_len: KV-cache length (default ``max(len(p)) + max_new_tokens`` rounded up to 64, or to the
        Mosaic kernel's KV block with ``attention_kernel='mosaic'``); the
        result does not depend on it.
      sequence_ids: per-prompt ints in ``[0, 2**32)`` for the random streams (default ``range(len(prompts))``).

    Returns:
      ``GenerationResult(tokens, logprobs)``, one numpy array per prompt. ``logprobs[i][s]`` is
      ``log_softmax`` of the float32 logits row of the *unmodified* model distribution (before
      temperature / top-k / top-p) at the generated token.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "prefill"):
        raise TypeError("model must be a detjax.models.Transformer")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, lo=1)
    p = _check_prompts(prompts, cfg.vocab_size)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number; got {temperature!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature}")
    top_k = _check_int("top_k", top_k, lo=1, allow_none=True)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p must be a number or None; got {top_p!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1]; got {top_p}")
        top_p = float(top_p)
    seed = _check_int("seed", seed, lo=-2**31, hi=2**32 - 1)
    if isinstance(stop_tokens, numbers.Integral):
        stop_tokens = (stop_tokens,)
    stop_tokens = tuple(_check_int(f"stop_tokens[{i}]", s, lo=0) for i, s in enumerate(stop_tokens))
    lens = np.asarray([len(x) for x in p], np.int32)
    need = int(lens.max()) + max_new_tokens
    if need > MAX_LEN_LIMIT:
        raise ValueError(f"max_new_tokens={max_new_tokens} is too large: the longest prompt plus "
                         f"max_new_tokens must fit int32 positions (<= {MAX_LEN_LIMIT})")
    if max_len is None:   # a whole number of the attention kernel's KV blocks: no padding copy
        unit = 64
        if getattr(model.config, "attention_kernel", "triton") == "mosaic":
            from pallas_kernels.attention_mgpu import block_k, padded_head_dim
            unit = block_k(padded_head_dim(model.config.head_dim))
        max_len = -(-need // unit) * unit
    else:
        max_len = _check_int("max_len", max_len, lo=1, hi=MAX_LEN_LIMIT)
        if max_len < need:
            raise ValueError(f"max_len={max_len} is too small: the longest prompt "
                             f"({int(lens.max())}) plus max_new_tokens ({max_new_tokens}) needs {need}")
    if sequence_ids is None:
        seq_ids = np.arange(len(p), dtype=np.int32)
    else:
        if len(sequence_ids) != len(p):
            raise ValueError(f"sequence_ids has {len(sequence_ids)} entries but there are {len(p)} "
                             "prompts")
        seq_ids = np.asarray([_check_int(f"sequence_ids[{i}]", s, lo=0, hi=2**32 - 1)
                              for i, s in enumerate(sequence_ids)], np.uint32).astype(np.int32)
    t = int(lens.max())
    tokens = np.zeros((len(p), t), np.int32)
    for i, x in enumerate(p):
        tokens[i, :len(x)] = x
    greedy = temperature == 0.0
    # Stop ids travel as a traced array padded with -1 to a multiple of 8 (fewer recompiles).
    n_stop = max(8, -(-len(stop_tokens) // 8) * 8)
    stops_padded = np.full((n_stop,), -1, np.int32)
    stops_padded[:len(stop_tokens)] = stop_tokens
    graphdef, state = nnx.split(model)
    out_t, out_l, steps = _generate_jit(
        state, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(seq_ids),
        jnp.uint32(seed & 0xFFFFFFFF) if seed >= 0 else jnp.int32(seed),
        jnp.float32(temperature if not greedy else 1.0),
        jnp.asarray(stops_padded),
        graphdef=graphdef, max_new_tokens=max_new_tokens, max_len=max_len, greedy=greedy,
        top_k=top_k, top_p=top_p, impl=getattr(model, "impl", None))
    out_t, out_l, steps = np.asarray(out_t), np.asarray(out_l), int(steps)
    toks, lps = [], []
    stop_set = set(stop_tokens)
    for i in range(len(p)):
        n = steps
        for s in range(steps):
            if int(out_t[i, s]) in stop_set:
                n = s + 1
                break
        toks.append(out_t[i, :n].copy())
        lps.append(out_l[i, :n].copy())
    return GenerationResult(toks, lps)
