"""Kernels of one gemma2_2b forward, grouped by name (CUPTI device time): the ``detjax.nn`` model
against ``detjax.deterministic`` of the same modules on plain XLA (fused patterns on, and off with
``--unfused``). GPU only.

Usage: ``python scripts/profile_transform.py [--batch 8] [--prompt 512] [--unfused] [--top 25]``
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from detjax.models.gemma import GemmaConfig, Transformer  # noqa: E402
from detjax.transform import deterministic  # noqa: E402


def _group(name):
    return re.sub(r"([._]\d+)+$", "", name.split("(")[0])


def profile(fwd, state, tokens, top, label):
    from jax.experimental.mosaic.gpu import profiler
    jax.block_until_ready(fwd(state, tokens))
    _, runs = profiler.measure(fwd, aggregate=False, iterations=3)(state, tokens)
    runs = runs if isinstance(runs[0], list) else [runs]
    per = [statistics.median(r[i][1] for r in runs) for i in range(len(runs[0]))]
    groups = collections.defaultdict(lambda: [0, 0.0])
    for (n, _), t in zip(runs[0], per):
        groups[_group(n)][0] += 1
        groups[_group(n)][1] += t
    print(f"== {label}: {len(per)} kernels, {sum(per):.2f} ms", flush=True)
    for n, (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {t:8.3f} ms {c:5d}x  {n}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gemma2_2b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--unfused", action="store_true")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    cfg = getattr(GemmaConfig, a.model)()
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, size=(a.batch, a.prompt)),
                         jnp.int32)
    variants = [("nn", "detjax", None), ("transform", "xla", True)]
    if a.unfused:
        variants.append(("transform fuse=False", "xla", False))
    for label, impl, fuse in variants:
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), impl=impl))

        def f(st, t, graphdef=graphdef):
            return nnx.merge(graphdef, st)(t)
        fwd = jax.jit(f if fuse is None else deterministic(f, fuse=fuse))
        profile(fwd, state, tokens, a.top, f"{label} B{a.batch} T{a.prompt}")
        del state, fwd


if __name__ == "__main__":
    main()
