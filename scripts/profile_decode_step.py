"""Where one decode step's time goes on the GPU: every kernel of one jitted ``decode_step``, timed
device-side (CUPTI), grouped by kernel name, for the same model on detjax and on plain XLA.

    PYTHONPATH=. python scripts/profile_decode_step.py [--model gemma2_2b] [--batch 8] [--cache 512]
        [--iters 10] [--top 25] [--loop-steps 64]

Per implementation it prints: the number of kernels one step launches, the sum of their device
times (median over ``--iters`` calls, kernel by kernel), and the kernels grouped by name (count,
total us). ``--loop-steps N`` also times N steps of a device-side ``lax.fori_loop`` (wall clock,
synchronised at the end), so ``loop ms/step - kernel ms`` is what the launches between the kernels
cost. GPU only (CUPTI).
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detjax.models.gemma import GemmaConfig, Transformer  # noqa: E402


def _group(name: str) -> str:
    """Kernel name without numeric suffixes (``loop_add_fusion_12`` -> ``loop_add_fusion``)."""
    name = name.split("(")[0]
    return re.sub(r"([._]\d+)+$", "", name)


def profile(model, batch, cache_len, iters, loop_steps):
    from jax.experimental.mosaic.gpu import profiler
    cfg = model.config
    graphdef, state = nnx.split(model)
    max_len = cache_len + max(loop_steps, 1) + 64
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(batch, cache_len)), jnp.int32)

    @jax.jit
    def prefill(state, prompt):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(batch, max_len)
        _, cache = m.prefill(prompt, jnp.full((batch,), cache_len, jnp.int32), cache)
        return cache

    @jax.jit
    def step(state, tok, cache):
        return nnx.merge(graphdef, state).decode_step(tok, cache)

    cache = prefill(state, prompt)
    tok = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(batch, 1)), jnp.int32)
    jax.block_until_ready(step(state, tok, cache))
    _, runs = profiler.measure(step, aggregate=False, iterations=iters)(state, tok, cache)
    runs = runs if isinstance(runs[0], list) else [runs]
    per_kernel = [statistics.median(r[i][1] for r in runs) for i in range(len(runs[0]))]
    names = [n for n, _ in runs[0]]
    groups = collections.defaultdict(lambda: [0, 0.0])
    for n, t in zip(names, per_kernel):
        g = groups[_group(n)]
        g[0] += 1
        g[1] += t
    out = dict(kernels=len(names), kernel_ms=sum(per_kernel), groups=dict(groups))
    if loop_steps:
        @jax.jit
        def loop(state, tok, cache):
            def body(_, c):
                tok, cache = c
                logits, cache = nnx.merge(graphdef, state).decode_step(tok, cache)
                return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache
            return jax.lax.fori_loop(0, loop_steps, body, (tok, cache))
        jax.block_until_ready(loop(state, tok, cache))
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(state, tok, cache))
            ts.append(time.perf_counter() - t0)
        out["loop_ms_per_step"] = min(ts) / loop_steps * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma2_2b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--loop-steps", type=int, default=64)
    ap.add_argument("--impls", default="xla,detjax")
    a = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        sys.exit("profile_decode_step.py needs a GPU (CUPTI timing)")
    kw = {} if a.layers is None else dict(num_layers=a.layers)
    cfg = getattr(GemmaConfig, a.model)(**kw)
    res = {}
    for impl in a.impls.split(","):
        model = Transformer(cfg, rngs=nnx.Rngs(0), impl=impl)
        res[impl] = r = profile(model, a.batch, a.cache, a.iters, a.loop_steps)
        print(f"\n== {a.model} B={a.batch} cache={a.cache} impl={impl}: {r['kernels']} kernels, "
              f"kernel sum {r['kernel_ms']:.3f} ms"
              + (f", fori_loop {r['loop_ms_per_step']:.3f} ms/step" if "loop_ms_per_step" in r else ""))
        for name, (n, t) in sorted(r["groups"].items(), key=lambda kv: -kv[1][1])[:a.top]:
            print(f"  {t * 1e3:9.1f} us  {n:5d}x  {name}")
        del model
    if len(res) == 2:
        x, d = (res[k] for k in a.impls.split(","))
        print(f"\nsummary: kernels {x['kernels']} vs {d['kernels']}; kernel ms {x['kernel_ms']:.3f} vs "
              f"{d['kernel_ms']:.3f}"
              + (f"; loop ms/step {x['loop_ms_per_step']:.3f} vs {d['loop_ms_per_step']:.3f}"
                 if "loop_ms_per_step" in x else ""))


if __name__ == "__main__":
    main()
