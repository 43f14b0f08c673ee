"""Session 15, run 1: decode of a cache of one 1024-key split in one kernel
(``attention.DECODE_FUSE_SINGLE_SPLIT``) against split + merge, in one process.

1. ``decode``: the decode shapes of caches <= 1024 keys (and one of 8k, where nothing changes), one
   token x 8 query heads; XLA, split + merge, one kernel; the two detjax outputs compared bitwise.
   Cache lengths ``S - (b mod 3)`` (ragged), gemma2_2b's soft cap 50 at head dim 256.
2. ``gen``: gemma2_2b greedy generation (prompt 512, 256 new tokens, cache 768: one split), XLA vs
   detjax with the flag off / on, logprobs compared bitwise (wall clock, median of 2 after two
   untimed calls). Batches from argv[2] (default 8).

3. ``sweep``: (num_warps, num_stages) of the one-kernel decode at the gemma2_2b shapes (B 1/8/64,
   cache 768, head dim 256, soft cap 50), bits compared with the default configuration's.

Run from the repo root: python results/2026-12-04-h200/s15_1_bench.py [decode,sweep,gen] [8,1]
"""
import sys
import time

sys.path.insert(0, ".")
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import copy_bandwidth_gbs, device_ms
from detjax.ops._attention import decode_attention
from pallas_kernels import attention as K

parts = set((sys.argv[1] if len(sys.argv) > 1 else "decode,gen").split(","))
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "8").split(",")]


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def same(x, y):
    return bool(np.array_equal(bits(x), bits(y)))


if "decode" in parts:
    copy = copy_bandwidth_gbs(10)
    print(f"copy ceiling {copy:.0f} GB/s", flush=True)
    shapes = [(8, 768, 4, 256), (1, 768, 4, 256), (64, 768, 4, 256), (8, 1024, 4, 128),
              (64, 1024, 4, 128), (1, 512, 1, 128), (8, 8192, 4, 256)]
    key = jax.random.key(5)
    for b, s, kh, h in shapes:
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, b * s + kh + h), 3)
        q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
        kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
        vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
        lengths = jnp.asarray([s - (i % 3) for i in range(b)], jnp.int32)
        cap = 50.0 if h == 256 else None

        def xla_decode(q, kc, vc, lengths):
            mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
            return jax.nn.dot_product_attention(q, kc, vc, mask=mask, implementation="xla")

        tx = device_ms(xla_decode, q, kc, vc, lengths)
        res = {}
        for label, flag in (("split+merge", False), ("one kernel", True)):
            K.DECODE_FUSE_SINGLE_SPLIT = flag
            jax.clear_caches()
            f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=cap)  # noqa: E731
            res[label] = (device_ms(f, q, kc, vc, lengths), jax.jit(f)(q, kc, vc, lengths))
        gb = (kc.nbytes + vc.nbytes) / 1e6
        line = " | ".join(f"{k} {t*1e3:6.1f} us ({tx/t:4.2f}x XLA, {100*gb/t/copy:4.1f}% copy)"
                          for k, (t, _) in res.items())
        print(f"decode B{b} cache{s} K{kh} H{h}: xla {tx*1e3:6.1f} us | {line} | same bits "
              f"{same(res['split+merge'][1], res['one kernel'][1])}", flush=True)
    K.DECODE_FUSE_SINGLE_SPLIT = True
    jax.clear_caches()

if "sweep" in parts:
    orig = K.gpu_config
    key = jax.random.key(6)
    for b in (1, 8, 64):
        s, kh, h = 768, 4, 256
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, b), 3)
        q = jax.random.normal(kq, (b, 1, 8, h), jnp.bfloat16)
        kc = jax.random.normal(kk, (b, s, kh, h), jnp.bfloat16)
        vc = jax.random.normal(kv, (b, s, kh, h), jnp.bfloat16)
        lengths = jnp.asarray([s - (i % 3) for i in range(b)], jnp.int32)
        f = lambda q, kc, vc, l: decode_attention(q, kc, vc, l, logits_soft_cap=50.0)  # noqa: E731
        K.gpu_config = orig
        jax.clear_caches()
        base_t, base = device_ms(f, q, kc, vc, lengths), jax.jit(f)(q, kc, vc, lengths)
        hv = 256 // K.decode_value_splits(256, b * kh, jnp.bfloat16)
        line = [f"default {orig(hv, 'decode', jnp.bfloat16)} {base_t*1e3:5.1f} us"]
        for cfg in ((2, 2), (2, 3), (2, 4), (4, 2), (4, 4), (8, 2), (8, 3)):
            K.gpu_config = lambda hp, kernel="prefill", dtype=None, cfg=cfg: (
                cfg if kernel == "decode" else orig(hp, kernel, dtype))
            jax.clear_caches()
            try:
                t, o = device_ms(f, q, kc, vc, lengths), jax.jit(f)(q, kc, vc, lengths)
                line.append(f"{cfg} {t*1e3:5.1f} us same={same(o, base)}")
            except Exception as e:   # a configuration may not fit the shared memory
                line.append(f"{cfg} failed {type(e).__name__}")
        print(f"sweep B{b} cache{s} K{kh} H{h} (E -> {hv} columns): " + " | ".join(line), flush=True)
    K.gpu_config = orig
    jax.clear_caches()

if "gen" in parts:
    from flax import nnx
    from detjax.generate import generate
    from detjax.models.gemma import GemmaConfig, Transformer
    config = GemmaConfig.gemma2_2b()
    for bsz in batches:
        rng = np.random.default_rng(0)
        prompts = [list(map(int, t)) for t in rng.integers(1, config.vocab_size, size=(bsz, 512))]
        outs = {}
        for label, impl, flag in (("xla", "xla", True), ("detjax split+merge", "detjax", False),
                                  ("detjax one kernel", "detjax", True)):
            K.DECODE_FUSE_SINGLE_SPLIT = flag
            jax.clear_caches()
            model = Transformer(config, rngs=nnx.Rngs(0), impl=impl)
            outs[label] = generate(model, prompts, 256, max_len=768)
            generate(model, prompts, 256, max_len=768)   # a first-ever trace can retrace once
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                generate(model, prompts, 256, max_len=768)
                ts.append(time.perf_counter() - t)
            print(f"gemma2_2b B{bsz} gen {label:19s}: {np.median(ts):.3f} s {ts}", flush=True)
            del model
        lp = lambda o: [np.asarray(x, np.float32) for x in o.logprobs]  # noqa: E731
        print(f"B{bsz} split+merge vs one kernel logprobs bitwise identical:",
              all(same(a, b) for a, b in zip(lp(outs["detjax split+merge"]), lp(outs["detjax one kernel"]))),
              flush=True)
    K.DECODE_FUSE_SINGLE_SPLIT = True
