"""Where do TP generation logprobs leave the single-device ones? (2 GPUs)"""
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, ".")
import detjax
from detjax import parallel as par
from detjax.parallel import _Local, P
from detjax.models.gemma import GemmaConfig, Transformer
from detjax import ops
from flax import nnx
from pallas_kernels import reductions as red

def cmp(tag, a, b):
    a, b = np.asarray(a), np.asarray(b)
    same = a.shape == b.shape and np.array_equal(a.view(np.uint32) if a.dtype == np.float32 else a, b.view(np.uint32) if b.dtype == np.float32 else b)
    d = float(np.nanmax(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape else -1
    print(f"{tag:50s} {'EQ ' if same else 'DIFF'} maxdiff={d:.3g} shape={a.shape}", flush=True)

prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3], [200, 100, 50]]
lens = np.array([len(p) for p in prompts], np.int32)
toks = np.zeros((5, 5), np.int32)
for i, p in enumerate(prompts): toks[i, :len(p)] = p

def study(tag, cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    pm = par.tensor_parallel(model, par.make_mesh(1, 2), allow_xla_autotuning=True)
    # embed
    gd, st, specs = pm._split(); d, m = pm._d(), pm._m(); lp = _Local(pm)
    emb_tp = jax.jit(pm._smap(lambda s, t: lp._embed(nnx.merge(gd, s), t), (specs, P(d)), P(d)))(st, toks)
    emb_1 = jax.jit(lambda t: model._embed(t))(toks)
    cmp(f"{tag} embed", emb_tp, emb_1)
    # forward, with and without lengths
    f1 = jax.jit(lambda t: model(t))(toks); ftp = par.forward(pm, toks)
    cmp(f"{tag} forward logits", ftp, f1)
    f1l = jax.jit(lambda t, l: model(t, l))(toks, lens); ftpl = par.forward(pm, toks, lens)
    cmp(f"{tag} forward(lengths) logits", ftpl, f1l)
    # prefill
    def pre(mdl):
        return jax.jit(lambda t, l: mdl.prefill(t, l, mdl.init_cache(5, 64)))(toks, lens)
    l1, c1 = pre(model); ltp, ctp = pre(pm)
    cmp(f"{tag} prefill logits", ltp, l1)
    last = f1[np.arange(5), lens - 1]
    cmp(f"{tag} prefill vs forward-last (single)", l1, last)
    cmp(f"{tag} prefill vs forward-last (tp)", ltp, np.asarray(ftp)[np.arange(5), lens - 1])
    for i in range(cfg.num_layers):
        cmp(f"{tag} cache k{i}", ctp["k"][i], c1["k"][i]); cmp(f"{tag} cache v{i}", ctp["v"][i], c1["v"][i])
    # log_softmax of sharded vs replicated
    ls = jax.jit(lambda x: ops.log_softmax(x, axis=-1))
    cmp(f"{tag} log_softmax(tp logits sharded) vs (single)", ls(ltp), ls(l1))
    cmp(f"{tag} log_softmax(np tp) vs (single)", ls(jnp.asarray(np.asarray(ltp))), ls(l1))
    # decode step from own caches, and from the single cache
    nt = np.array([[1], [2], [3], [4], [5]], np.int32)
    d1, _ = jax.jit(lambda t, c: model.decode_step(t, c))(nt, c1)
    dtp, _ = jax.jit(lambda t, c: pm.decode_step(t, c))(nt, ctp)
    cmp(f"{tag} decode logits own caches", dtp, d1)
    dtp2, _ = jax.jit(lambda t, c: pm.decode_step(t, c))(nt, c1)
    cmp(f"{tag} decode logits tp from single cache", dtp2, d1)
    # whole generate
    ref = detjax.generate(model, prompts, max_new_tokens=6)
    out = par.generate(pm, prompts, 6)
    for i in range(5):
        cmp(f"{tag} gen logprobs[{i}]", out.logprobs[i], ref.logprobs[i])
    return model

print(jax.devices())
study("base", GemmaConfig.tiny(num_heads=8, num_kv_heads=2))
study("nocap", GemmaConfig.tiny(num_heads=8, num_kv_heads=2, final_logits_soft_cap=None, attn_logits_soft_cap=None))
red.RESIDENT_MAX_CHUNKS = 0; jax.clear_caches()
study("noresident", GemmaConfig.tiny(num_heads=8, num_kv_heads=2))
