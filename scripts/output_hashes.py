"""Hashes of the outputs of a fixed test set, to compare devices (e.g. H100 vs H200) bit for bit.

Usage: ``python scripts/output_hashes.py [--json OUT]``. Inputs come from fixed seeds; every op runs
on the current detjax backend. Two devices give the same bits iff every line matches.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detjax  # noqa: E402
from detjax import ops  # noqa: E402


def h(x) -> str:
    return hashlib.sha256(np.asarray(x).tobytes()).hexdigest()[:16]


def cases():
    k = jax.random.key(1234)
    ks = jax.random.split(k, 8)
    a = jax.random.normal(ks[0], (257, 1000), jnp.bfloat16)
    w = jax.random.normal(ks[1], (1000, 520), jnp.bfloat16)
    a32 = jax.random.normal(ks[2], (33, 700), jnp.float32)
    w32 = jax.random.normal(ks[3], (700, 130), jnp.float32)
    q = jax.random.normal(ks[4], (2, 70, 8, 64), jnp.bfloat16)
    kv = jax.random.normal(ks[5], (2, 70, 2, 64), jnp.bfloat16)
    s = jax.random.normal(ks[6], (1000,), jnp.bfloat16) * 0.1
    yield "matmul bf16 257x1000x520", ops.matmul(a, w)
    yield "matmul f32 33x700x130", ops.matmul(a32, w32)
    yield "rms_norm bf16", ops.rms_norm(a, s)
    yield "softmax bf16", ops.softmax(a)
    yield "logsumexp f32", ops.logsumexp(a32)
    yield "sum f32", ops.sum(a32)
    yield "cumsum f32", ops.cumsum(a32)
    yield "attention bf16 causal", ops.attention(q, kv, kv, causal=True)
    yield "decode_attention bf16", ops.decode_attention(q[:, :1], kv, kv, jnp.array([70, 33], jnp.int32))
    from flax import nnx
    from detjax.models.gemma import GemmaConfig, Transformer
    model = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(ks[7], (3, 20), 1, model.config.vocab_size)
    yield "gemma tiny logits", nnx.jit(lambda m, t: m(t))(model, tokens)
    out = detjax.generate(model, [[5, 6, 7, 8], [9, 10]], 8)
    yield "gemma tiny generate logprobs", np.concatenate([np.asarray(x) for x in out.logprobs])
    # added in session 8: the float32 FMA tile, a bf16 model (fused RoPE/GeGLU/residual-norm paths)
    a32b = jax.random.normal(ks[2], (1030, 700), jnp.float32)
    w32b = jax.random.normal(ks[3], (700, 300), jnp.float32)
    yield "matmul f32 1030x700x300", ops.matmul(a32b, w32b)
    bf = Transformer(GemmaConfig.tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    yield "gemma tiny bf16 logits", nnx.jit(lambda m, t: m(t))(bf, tokens)
    out = detjax.generate(bf, [[5, 6, 7, 8], [9, 10]], 8)
    yield "gemma tiny bf16 generate logprobs", np.concatenate([np.asarray(x) for x in out.logprobs])
    # added in session 11: the opt-in Mosaic GPU attention (Hopper only; its own order)
    from detjax import experimental
    if experimental.mosaic_available()[0]:
        q2 = jax.random.normal(ks[4], (2, 300, 8, 128), jnp.bfloat16)
        kv2 = jax.random.normal(ks[5], (2, 300, 2, 128), jnp.bfloat16)
        yield "mosaic attention bf16 H128", experimental.mosaic_attention(q2, kv2, kv2)
        yield "mosaic decode bf16 H64", experimental.mosaic_decode_attention(
            q[:, :1], kv, kv, jnp.array([70, 33], jnp.int32))
        bm = Transformer(GemmaConfig.tiny(dtype="bfloat16", param_dtype="bfloat16",
                                          attention_kernel="mosaic"), rngs=nnx.Rngs(0))
        out = detjax.generate(bm, [[5, 6, 7, 8], [9, 10]], 8)
        yield "gemma tiny bf16 mosaic generate", np.concatenate([np.asarray(x) for x in out.logprobs])
    # added in session 17 (after the 17 rows above, which stay comparable with older runs): the
    # paths sessions 11-16 added — the 2-warp deep tile (M <= 16, K >= 8192), the Mosaic matmul
    # dispatch (16 < M <= 64, wide weights; Triton elsewhere), a narrow projection at M = 7,
    # multi-split decode at head dim 256 with value splits and a soft cap, the derived row ops,
    # and prefill with a window and a soft cap at head dim 256
    ks2 = jax.random.split(jax.random.key(4321), 10)
    wd = jax.random.normal(ks2[0], (9216, 2304), jnp.bfloat16)
    wu = jax.random.normal(ks2[1], (2304, 9216), jnp.bfloat16)
    yield "matmul bf16 8x9216x2304", ops.matmul(jax.random.normal(ks2[2], (8, 9216), jnp.bfloat16), wd)
    yield "matmul bf16 33x2304x9216", ops.matmul(jax.random.normal(ks2[3], (33, 2304), jnp.bfloat16), wu)
    yield "matmul bf16 7x2304x1024", ops.matmul(jax.random.normal(ks2[3], (7, 2304), jnp.bfloat16),
                                                wu[:, :1024])
    q3 = jax.random.normal(ks2[4], (3, 1, 8, 256), jnp.bfloat16)
    kv3 = jax.random.normal(ks2[5], (3, 2100, 4, 256), jnp.bfloat16)
    yield "decode_attention bf16 H256 3 splits", ops.decode_attention(
        q3, kv3, kv3, jnp.array([2100, 1025, 7], jnp.int32), logits_soft_cap=50.0)
    r = jax.random.normal(ks2[6], (64, 5000), jnp.bfloat16) * 4
    yield "logsumexp bf16 64x5000", ops.logsumexp(r)
    yield "log_softmax bf16 64x5000", ops.log_softmax(r)
    q4 = jax.random.normal(ks2[7], (2, 300, 8, 256), jnp.bfloat16)
    kv4 = jax.random.normal(ks2[8], (2, 300, 4, 256), jnp.bfloat16)
    yield "attention bf16 H256 window soft cap", ops.attention(
        q4, kv4, kv4, causal=True, sliding_window=100, logits_soft_cap=30.0)
    # added in session 19: prefill across 1024-key splits (the path ``prefill_call`` may send
    # through the split-parallel kernels; the same bits either way)
    ks3 = jax.random.split(jax.random.key(1919), 4)
    yield "attention bf16 H256 causal 2 splits", ops.attention(
        jax.random.normal(ks3[0], (1, 1100, 8, 256), jnp.bfloat16),
        *[jax.random.normal(ks3[1], (1, 1100, 4, 256), jnp.bfloat16)] * 2, logits_soft_cap=50.0)
    yield "attention bf16 H128 K1 causal 3 splits", ops.attention(
        jax.random.normal(ks3[2], (1, 2100, 8, 128), jnp.bfloat16),
        *[jax.random.normal(ks3[3], (1, 2100, 1, 128), jnp.bfloat16)] * 2)
    # added in session 23: the Mosaic attention over several 1024-key spans (its default order, no
    # splits)
    if experimental.mosaic_available()[0]:
        ks4 = jax.random.split(jax.random.key(2323), 4)
        q5 = jax.random.normal(ks4[0], (1, 2600, 8, 256), jnp.bfloat16)
        kv5 = jax.random.normal(ks4[1], (1, 2600, 4, 256), jnp.bfloat16)
        yield "mosaic attention bf16 H256 2600 keys", experimental.mosaic_attention(q5, kv5, kv5)
        kv6 = jax.random.normal(ks4[2], (3, 2100, 2, 128), jnp.bfloat16)
        yield "mosaic decode bf16 H128 2100 keys", experimental.mosaic_decode_attention(
            jax.random.normal(ks4[3], (3, 1, 8, 128), jnp.bfloat16), kv6, kv6,
            jnp.array([2100, 1025, 7], jnp.int32), logits_soft_cap=50.0)
        # added in session 24: the opt-in split order (attention_mgpu.forward(..., splits=True)),
        # whose decode = prefill held on the H100 (s24-2): its bits tracked across devices
        from pallas_kernels import attention as attn_k
        from pallas_kernels import attention_mgpu as mgpu_k
        ks5 = jax.random.split(jax.random.key(2424), 4)
        split = functools.partial(mgpu_k.forward, causal=True, sliding_window=None, soft_cap=None,
                                  splits=True)
        q7 = jax.random.normal(ks5[0], (1, 2600, 8, 128), jnp.bfloat16)
        kv7 = jax.random.normal(ks5[1], (1, 2600, 2, 128), jnp.bfloat16)
        yield "mosaic split order bf16 H128 2600 keys", split(
            q7, kv7, kv7, attn_k.default_q_positions(1, 2600, 2600), jnp.array([2600], jnp.int32),
            scale=128 ** -0.5)[0]
        kv8 = jax.random.normal(ks5[2], (3, 2100, 2, 256), jnp.bfloat16)
        lens8 = jnp.array([2100, 1025, 7], jnp.int32)
        yield "mosaic split order decode bf16 H256 2100 keys", split(
            jax.random.normal(ks5[3], (3, 1, 8, 256), jnp.bfloat16), kv8, kv8, lens8[:, None] - 1,
            lens8, scale=256 ** -0.5)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="a --json file of another run (e.g. another device): say row by row whether "
                        "the bits are the same; exit 1 if a row both runs have differs")
    args = p.parse_args(argv)
    rows = [(name, h(x)) for name, x in cases()]
    dev = jax.devices()[0].device_kind
    print(f"device: {dev}  backend: {detjax.chosen_backend()}  jax {jax.__version__}")
    for name, digest in rows:
        print(f"{name:36s} {digest}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev, rows=dict(rows)), indent=1))
    if args.compare:
        return compare(dict(rows), json.loads(Path(args.compare).read_text()), args.compare)
    return 0


def compare(rows: dict, old: dict, label: str) -> int:
    """Print ``same`` / ``DIFFERS`` / ``new`` per row against ``old`` (a ``--json`` file's dict)."""
    ref = old["rows"]
    same = [k for k in rows if k in ref and ref[k] == rows[k]]
    differ = [k for k in rows if k in ref and ref[k] != rows[k]]
    print(f"against {label} ({old.get('device', '?')}):")
    for k in rows:
        print(f"  {k:36s} {'new' if k not in ref else 'same' if k in same else 'DIFFERS'}")
    print(f"{len(same)} of {len(same) + len(differ)} shared rows equal"
          + (f"; {len(rows) - len(same) - len(differ)} rows new" if len(rows) > len(same) + len(differ) else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
