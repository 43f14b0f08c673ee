"""Forward of gemma2_2b: kernels grouped by name (CUPTI): detjax.nn vs deterministic(XLA model)."""
import sys, re, collections, statistics
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, ".")
from detjax.models.gemma import GemmaConfig, Transformer
from detjax.transform import deterministic
from jax.experimental.mosaic.gpu import profiler
B, T = int(sys.argv[1]), int(sys.argv[2])
cfg = GemmaConfig.gemma2_2b()
def group(n):
    return re.sub(r"([._]\d+)+$", "", n.split("(")[0])
tok = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, size=(B, T)), jnp.int32)
for name in ("nn", "transform"):
    model = Transformer(cfg, rngs=nnx.Rngs(0), impl="detjax" if name == "nn" else "xla")
    gd, st = nnx.split(model)
    f = lambda st, t: nnx.merge(gd, st)(t)
    fwd = jax.jit(f if name == "nn" else deterministic(f))
    jax.block_until_ready(fwd(st, tok))
    _, runs = profiler.measure(fwd, aggregate=False, iterations=2)(st, tok)
    runs = runs if isinstance(runs[0], list) else [runs]
    per = [statistics.median(r[i][1] for r in runs) for i in range(len(runs[0]))]
    g = collections.defaultdict(lambda: [0, 0.0])
    for (n, _), t in zip(runs[0], per):
        g[group(n)][0] += 1; g[group(n)][1] += t
    print(f"== {name} B{B} T{T}: {len(per)} kernels, {sum(per):.2f} ms", flush=True)
    for n, (c, t) in sorted(g.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {t:8.3f} ms {c:5d}x  {n}", flush=True)
    del model, st, fwd
