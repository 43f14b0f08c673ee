"""Optimized HLO of one gemma2_2b (2 layers) decode step on detjax: the non-Pallas fusions and their shapes."""
import sys, re
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, ".")
from detjax.models.gemma import GemmaConfig, Transformer
B = int(sys.argv[1]) if len(sys.argv) > 1 else 8
cfg = GemmaConfig.gemma2_2b(num_layers=2)
model = Transformer(cfg, rngs=nnx.Rngs(0), impl="detjax")
gd, st = nnx.split(model)
cache = nnx.merge(gd, st).init_cache(B, 640)
cache["lengths"] = jnp.full((B,), 512, jnp.int32)
tok = jnp.ones((B, 1), jnp.int32)
def loop(st, tok, cache):
    def body(_, c):
        tok, cache = c
        logits, cache = nnx.merge(gd, st).decode_step(tok, cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache
    return jax.lax.fori_loop(0, 4, body, (tok, cache))
txt = jax.jit(loop).lower(st, tok, cache).compile().as_text()
for line in txt.splitlines():
    s = line.strip()
    if re.match(r"^(ROOT )?%?[\w.-]+ = .*\b(fusion|custom-call|copy|transpose)\(", s) and "ENTRY" not in s:
        name = s.split("=")[0].strip()
        if any(k in s for k in ("kind=kLoop", "kind=kInput", "copy(", "transpose(", "kind=kCustom")) and "__gpu$xla.gpu.triton" not in s:
            print(s[:260])
