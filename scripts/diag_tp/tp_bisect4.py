"""TP grad / generation vs single device on 2 GPUs: which leaves differ, what XLA dots remain."""
import os, re, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "."); sys.path.insert(0, "scripts")
import detjax
from detjax import parallel as par
from detjax.models.gemma import GemmaConfig, Transformer
from flax import nnx
import multidevice_check as mdc
OUT = os.environ.get("OUT", ".")

def leafdiff(tag, a, b):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]; fb = jax.tree.leaves(b)
    for (p, x), y in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        if not np.array_equal(x, y):
            print(f"{tag} DIFF {jax.tree_util.keystr(p)} maxdiff={np.max(np.abs(x.astype(np.float64)-y)):.3g} n={int((x!=y).sum())}/{x.size}", flush=True)
    print(f"{tag} compared {len(fa)} leaves", flush=True)

def suspicious(tag, txt):
    open(f"{OUT}/{tag}.hlo.txt", "w").write(txt)
    pats = ["cublas", "__triton_gemm", "triton_gemm", "kCustom", " dot(", "reduce(", "all-reduce", "reduce-scatter", "scatter("]
    for pat in pats:
        n = txt.count(pat)
        if n: print(f"{tag} hlo '{pat}': {n}", flush=True)

model = Transformer(mdc.tp_grad_config(), rngs=nnx.Rngs(0))
rng = np.random.default_rng(3)
toks = rng.integers(0, model.config.vocab_size, (4, 10)).astype(np.int32)
toks[0, 5] = toks[1, 7] = toks[0, 1]
m1 = par.make_mesh(1, 1)
r1 = par.dp_value_and_grad(model, toks, m1, block_size=2)
r1b = par.dp_value_and_grad(model, toks, m1, block_size=2)
leafdiff("single run-to-run", r1, r1b)
pm = par.tensor_parallel(model, par.make_mesh(1, 2), allow_xla_autotuning=True)
t1 = par.tp_value_and_grad(pm, toks, block_size=2)
t2 = par.tp_value_and_grad(pm, toks, block_size=2)
leafdiff("tp run-to-run", t1, t2)
leafdiff("tp vs single", t1, r1)
# which leaves, and where in them
fa = jax.tree_util.tree_flatten_with_path(t1)[0]; fb = jax.tree.leaves(r1)
for (p, x), y in zip(fa, fb):
    x, y = np.asarray(x), np.asarray(y)
    if not np.array_equal(x, y):
        idx = np.argwhere(x != y)
        print("   ", jax.tree_util.keystr(p), "first diffs at", idx[:6].tolist(), "rows with diffs", sorted(set(idx[:, 0].tolist()))[:20], flush=True)
print("tokens", toks.tolist())
