"""Count what one decode step of a Gemma-style model is made of: Pallas kernels by name, optimization
barriers and the other jaxpr primitives (a lower bound on the kernels a GPU launches per step).

    PYTHONPATH=. python scripts/decode_step_ops.py [--model gemma2_2b] [--layers 2] [--batch 8]

Runs on a CPU: it traces the step as the GPU backend would (``pallas_kernels.backend`` is told the
platform is a GPU) and only builds the jaxpr; nothing is compiled or run. Pallas calls are counted,
not entered; every other sub-jaxpr (jit, custom_vjp, cond, ...) is entered.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels.backend as _backend
from detjax.models.gemma import GemmaConfig, Transformer
from detjax.transform import _open, _subjaxprs


def count(jaxpr, counts):
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "pallas_call":
            info = e.params.get("name_and_src_info", e.params.get("name", "?"))
            counts["pallas " + str(info).split(" ")[0]] += 1
            continue
        counts[name] += 1
        for sub in _subjaxprs(e):
            count(_open(sub)[0], counts)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma2_2b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=640)
    a = ap.parse_args(argv)
    _backend._platform = lambda: "gpu"   # trace the GPU kernels' wrappers; nothing is lowered
    cfg = getattr(GemmaConfig, a.model)(num_layers=a.layers)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(lambda: model.init_cache(a.batch, a.max_len)))
    tokens = jnp.zeros((a.batch, 1), jnp.int32)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state).decode_step(tokens, cache)

    counts = count(jax.make_jaxpr(step)(state, tokens, cache).jaxpr, collections.Counter())
    print(f"{a.model}, {a.layers} layers, batch {a.batch}: one decode step")
    for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{v:6d}  {k}")


if __name__ == "__main__":
    main()
