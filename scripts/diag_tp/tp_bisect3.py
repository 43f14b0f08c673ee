"""Memory-content and recompilation dependence of single/TP generation and gradients (2 GPUs)."""
import os, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "."); sys.path.insert(0, "scripts")
import detjax
from detjax import parallel as par
from detjax.models.gemma import GemmaConfig, Transformer
from flax import nnx
import multidevice_check as mdc

def same(a, b):
    return all(np.array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8), np.atleast_1d(np.asarray(y)).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

big = Transformer(mdc.test_config(), rngs=nnx.Rngs(0))
small = Transformer(mdc.tp_grad_config(), rngs=nnx.Rngs(0))
prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3], [200, 100, 50]]
rng = np.random.default_rng(3)
toks = rng.integers(0, 256, (4, 10)).astype(np.int32); toks[0, 5] = toks[1, 7] = toks[0, 1]
pm_big = par.tensor_parallel(big, par.make_mesh(1, 2), allow_xla_autotuning=True)
pm_small = par.tensor_parallel(small, par.make_mesh(1, 2), allow_xla_autotuning=True)

def runall():
    return dict(
        gen1=detjax.generate(big, prompts, max_new_tokens=6).logprobs,
        gentp=par.generate(pm_big, prompts, 6).logprobs,
        grad1=par.dp_value_and_grad(small, toks, par.make_mesh(1, 1), block_size=2),
        gradtp=par.tp_value_and_grad(pm_small, toks, block_size=2),
        fwd1=np.asarray(jax.jit(lambda t: big(t))(jnp.asarray(toks[:, :5]))),
    )

def garbage(kind):
    xs = []
    for d in jax.devices():
        for _ in range(8):
            if kind == "nan":
                a = jnp.full((int(os.environ.get("GB", "256")), 1024, 1024), jnp.nan, jnp.float32)
            else:
                a = jax.random.normal(jax.random.PRNGKey(len(xs)), (int(os.environ.get("GB", "256")), 1024, 1024)) * 1e3
            xs.append(jax.device_put(a, d))
    jax.block_until_ready(xs); del xs

def report(tag, r, base):
    print(tag, " ".join(f"{k}:{'=' if same(r[k], base[k]) else 'DIFF'}" for k in base),
          "| tp==single gen:", same(r["gen1"], r["gentp"]), "grad:", same(r["grad1"], r["gradtp"]), flush=True)

A = runall(); report("fresh", A, A)
B = runall(); report("again", B, A)
garbage("nan"); C = runall(); report("after-nan-fill", C, A)
garbage("rand"); D = runall(); report("after-rand-fill", D, A)
jax.clear_caches(); E = runall(); report("recompiled", E, A)
jax.clear_caches(); F = runall(); report("recompiled2", F, A)
mdc.check_tp_grad(2); G = runall(); report("after-check_tp_grad", G, A)
