"""Forward pass of gemma2_2b: kernels grouped by name (CUPTI), xla vs detjax."""
import sys, re, collections, statistics
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, ".")
from detjax.models.gemma import GemmaConfig, Transformer
B, T = int(sys.argv[1]), int(sys.argv[2])
cfg = GemmaConfig.gemma2_2b()
def group(n):
    return re.sub(r"([._]\d+)+$", "", n.split("(")[0])
res = {}
for impl in ("xla", "detjax"):
    from jax.experimental.mosaic.gpu import profiler
    model = Transformer(cfg, rngs=nnx.Rngs(0), impl=impl)
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(gd, st)(t))
    tok = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, size=(B, T)), jnp.int32)
    jax.block_until_ready(fwd(st, tok))
    _, runs = profiler.measure(fwd, aggregate=False, iterations=2)(st, tok)
    runs = runs if isinstance(runs[0], list) else [runs]
    per = [statistics.median(r[i][1] for r in runs) for i in range(len(runs[0]))]
    g = collections.defaultdict(lambda: [0, 0.0])
    for (n, _), t in zip(runs[0], per):
        g[group(n)][0] += 1; g[group(n)][1] += t
    print(f"== {impl} B{B} T{T}: {len(per)} kernels, {sum(per):.2f} ms", flush=True)
    for n, (c, t) in sorted(g.items(), key=lambda kv: -kv[1][1])[:22]:
        print(f"  {t:8.3f} ms {c:5d}x  {n}", flush=True)
    del model, st, fwd
