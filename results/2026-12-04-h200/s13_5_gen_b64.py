"""Session 13, run 5: gemma2_2b (random weights) B64 greedy generation, prompt 512, 128 new tokens,
detjax default path with the Mosaic decode-matmul dispatch off and on (one process, fresh traces;
wall clock, median of 2 after the compiling call); tokens/logprobs compared bitwise.

Run from the repo root: python results/2026-12-04-h200/s13_5_gen_b64.py
"""
import sys
import time

sys.path.insert(0, ".")
import jax
import numpy as np
from flax import nnx

from detjax.generate import generate
from detjax.models.gemma import GemmaConfig, Transformer
from pallas_kernels import matmul_mgpu as mg

config = GemmaConfig.gemma2_2b()
model = Transformer(config, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
prompts = [list(map(int, t)) for t in rng.integers(1, config.vocab_size, size=(64, 512))]
outs = {}
for enabled in (False, True):
    mg.ENABLED = enabled
    jax.clear_caches()
    outs[enabled] = generate(model, prompts, 128, max_len=640)
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        generate(model, prompts, 128, max_len=640)
        ts.append(time.perf_counter() - t)
    print(f"B=64 mosaic_matmul={enabled}: {np.median(ts):.3f} s ({ts})", flush=True)
same = all(np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
           for x, y in zip(outs[True].logprobs, outs[False].logprobs))
print(f"B=64: logprobs bitwise identical with and without the dispatch: {same}", flush=True)
