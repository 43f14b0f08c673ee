"""Which model feature makes TP gradients differ from one device? (2 GPUs)"""
import sys, time, numpy as np, jax
sys.path.insert(0, "."); sys.path.insert(0, "scripts")
from detjax import parallel as par
from detjax.models.gemma import GemmaConfig, Transformer
from flax import nnx
rng = np.random.default_rng(3)
toks = rng.integers(0, 256, (4, 10)).astype(np.int32); toks[0, 5] = toks[1, 7] = toks[0, 1]
base = dict(num_heads=8, num_kv_heads=2, num_layers=1)
variants = [("base", {}), ("nofinalcap", dict(final_logits_soft_cap=None)),
            ("noattncap", dict(attn_logits_soft_cap=None)), ("noqknorm", dict(use_qk_norm=False)),
            ("nopostnorm", dict(use_post_norms=False)), ("noembedscale", dict(embed_scale_by_sqrt_dim=False)),
            ("minimal", dict(final_logits_soft_cap=None, attn_logits_soft_cap=None, use_qk_norm=False,
                             use_post_norms=False, embed_scale_by_sqrt_dim=False))]
import os
for name, kw in variants[:int(os.environ.get("NV", "99"))]:
    t0 = time.time()
    model = Transformer(GemmaConfig.tiny(**base, **kw), rngs=nnx.Rngs(0))
    r1 = par.dp_value_and_grad(model, toks, par.make_mesh(1, 1), block_size=2)
    t1 = par.tp_value_and_grad(par.tensor_parallel(model, par.make_mesh(1, 2), allow_xla_autotuning=True), toks, block_size=2)
    fa = jax.tree_util.tree_flatten_with_path(t1)[0]; fb = jax.tree.leaves(r1)
    bad = [jax.tree_util.keystr(p).replace(".value", "").replace("['layers'][0]", "L0") for (p, x), y in zip(fa, fb)
           if not np.array_equal(np.asarray(x), np.asarray(y))]
    print(f"{name:14s} {len(bad)}/{len(fa)} leaves differ {time.time()-t0:.0f}s: {' '.join(bad)[:300]}", flush=True)
