"""Session 6: which per-row quantities of the attention block step depend on the q-tile height /
warp count on the GPU, and does a dot-based row sum make them tile-independent?

Part A (micro): one kernel folding 2 KV blocks with A._logits + A._block_step for a q tile of bm rows
and nw warps; state (m, l, acc) in f32 compared bitwise against bm=64/nw=4.
Part B (real kernels): decode (knobs: rows per tile, decode warps/stages, row-sum mode) against
prefill, f32/f16/bf16 x head dims 64/128/256; then timings.
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, ".")
import pallas_kernels.attention as A  # noqa: E402
from benchmarks.bench_kernels import device_ms  # noqa: E402
from detjax.ops._attention import attention, decode_attention  # noqa: E402

T0 = time.time()
HI = lax.Precision.HIGHEST


def sum_plain(p, vdt):
    return jnp.sum(p, axis=-1)


def sum_fma(p, vdt):
    ones = jnp.ones((p.shape[-1], 16), jnp.float32)
    return jnp.max(lax.dot_general(p, ones, (((1,), (0,)), ((), ())), precision=HI,
                                   preferred_element_type=jnp.float32), axis=-1)


def sum_mma(p, vdt):
    if jnp.dtype(vdt) == jnp.float32:
        return sum_fma(p, vdt)
    ones = jnp.ones((p.shape[-1], 16), vdt)
    return jnp.max(lax.dot_general(p.astype(vdt), ones, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32), axis=-1)


MODES = {"sum": sum_plain, "fma": sum_fma, "mma": sum_mma}
ORIG = dict(row_sum=A._row_sum, gpu_config=A.gpu_config, rows=A.decode_block_rows)


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# ------------------------------------------------------------------------------------ part A
def micro(q, k, v, lo, hi, bm, nw, mode):
    R, H = q.shape
    cfg = A.AttnConfig(1.0 / np.sqrt(H), None, "gpu")
    rs = MODES[mode]

    def kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref):
        A._row_sum = rs
        try:
            qq, lo_, hi_ = q_ref[...], lo_ref[...], hi_ref[...]
            st = A._empty_state((bm,), H)
            for j in range(2):
                kb, vb = k_ref[pl.ds(j * 64, 64), :], v_ref[pl.ds(j * 64, 64), :]
                kidx = j * 64 + jnp.arange(64, dtype=jnp.int32)
                s, valid = A._logits(qq, kb, kidx, lo_, hi_, cfg)
                st = A._block_step(st, s, valid, vb, False)
        finally:
            A._row_sum = ORIG["row_sum"]
        m_ref[...], l_ref[...], acc_ref[...] = st

    rowv = pl.BlockSpec((bm,), lambda i: (i,))
    return pl.pallas_call(
        kernel, grid=(R // bm,),
        in_specs=[rowv, rowv, pl.BlockSpec((bm, H), lambda i: (i, 0)),
                  pl.BlockSpec((128, H), lambda i: (0, 0)), pl.BlockSpec((128, H), lambda i: (0, 0))],
        out_specs=[rowv, rowv, pl.BlockSpec((bm, H), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((R,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((R, H), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=1),
        interpret=jax.default_backend() == "cpu",
    )(lo, hi, q, k, v)


def part_a():
    print("== part A: micro block-step state vs bm=64/nw=4 (rows with all of m, l, acc equal) ==", flush=True)
    for dt in (jnp.float32, jnp.float16, jnp.bfloat16):
        for H in (64, 128, 256):
            line = []
            for mode in ("sum", "fma", "mma"):
                if mode == "mma" and dt == jnp.float32:
                    continue
                eq = {}
                for seed in range(1):
                    ks = jax.random.split(jax.random.key(seed), 5)
                    R = 512
                    q = jax.random.normal(ks[0], (R, H), dt)
                    k = jax.random.normal(ks[1], (128, H), dt)
                    v = jax.random.normal(ks[2], (128, H), dt)
                    lo = jax.random.randint(ks[3], (R,), 0, 60)
                    hi = jnp.minimum(lo + jax.random.randint(ks[4], (R,), 1, 128), 128)
                    ref = [np.asarray(x) for x in micro(q, k, v, lo, hi, 64, 4, mode)]
                    for bm, nw in ((64, 8), (32, 4), (16, 4), (16, 2), (16, 1)):
                        try:
                            out = [np.asarray(x) for x in micro(q, k, v, lo, hi, bm, nw, mode)]
                        except Exception as e:  # noqa: BLE001
                            eq[(bm, nw)] = f"ERR {type(e).__name__}"
                            continue
                        ok = ((bits(out[0]) == bits(ref[0])) & (bits(out[1]) == bits(ref[1]))
                              & np.all(bits(out[2]) == bits(ref[2]), axis=1))
                        prev = eq.get((bm, nw), (0, 0))
                        if isinstance(prev, str):
                            continue
                        eq[(bm, nw)] = (prev[0] + int(ok.sum()), prev[1] + R)
                line.append(mode + ": " + " ".join(
                    f"{bm}r{nw}w={v if isinstance(v, str) else f'{v[0]}/{v[1]}'}" for (bm, nw), v in eq.items()))
            print(f"  {jnp.dtype(dt).name:8s} H{H:3d}  " + " | ".join(line), flush=True)


# ------------------------------------------------------------------------------------ part B
def set_variant(rows, nw, ns, mode):
    jax.clear_caches()
    A._row_sum = MODES[mode]
    A.decode_block_rows = (lambda r: rows if r <= rows else 64)
    base = ORIG["gpu_config"]

    def cfg(h, kernel="prefill"):
        w, s = base(h)
        if kernel == "decode":
            return (nw or w, ns or s)
        return (w, s)
    A.gpu_config = cfg


PRE = {}


def dec_vs_prefill(dt, H):
    B, S, N, K = 2, 1100, 8, 4
    ks = jax.random.split(jax.random.key(H + 7), 3)
    q = jax.random.normal(ks[0], (B, S, N, H), dt)
    k = jax.random.normal(ks[1], (B, S, K, H), dt)
    v = jax.random.normal(ks[2], (B, S, K, H), dt)
    key = (jnp.dtype(dt).name, H, A._row_sum)
    if key not in PRE:
        PRE[key] = np.asarray(attention(q, k, v, logits_soft_cap=50.0))
    pre = PRE[key]
    Ls = [1, 2, 63, 64, 65, 129, 500, 1023, 1024, 1025, 1100, 777]
    bs = [i % 2 for i in range(len(Ls))]
    maxlen = 1152
    kc = jnp.stack([jnp.pad(k[b], ((0, maxlen - S), (0, 0), (0, 0)), constant_values=jnp.nan) for b in bs])
    vc = jnp.stack([jnp.pad(v[b], ((0, maxlen - S), (0, 0), (0, 0)), constant_values=jnp.nan) for b in bs])
    kc = jnp.where(jnp.arange(maxlen)[None, :, None, None] >= jnp.array(Ls)[:, None, None, None], jnp.nan, kc)
    qd = jnp.stack([q[b, L - 1] for b, L in zip(bs, Ls)])[:, None]
    d = np.asarray(decode_attention(qd, kc, vc, jnp.array(Ls, jnp.int32), logits_soft_cap=50.0))
    want = np.stack([pre[b, L - 1] for b, L in zip(bs, Ls)])[:, None]
    e = bits(d) == bits(want)
    return int(e.sum()), e.size, int(np.all(e.reshape(len(Ls), -1), axis=1).sum()), len(Ls)


PERF = [("gemma2 B8 S640 L576 H256 K4 cap50", 8, 640, 576, 256, 4, 50.0),
        ("B64 S1024 L768 H256 K4 cap50", 64, 1024, 768, 256, 4, 50.0),
        ("B8 S8192 H256 K4", 8, 8192, 8192, 256, 4, None),
        ("B8 S8192 H128 K4", 8, 8192, 8192, 128, 4, None),
        ("B1 S8192 H128 K1", 1, 8192, 8192, 128, 1, None)]


def perf(tag):
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    for name, b, s, L, H, K, cap in PERF:
        q = jax.random.normal(kq, (b, 1, 8, H), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, K, H), jnp.bfloat16)
        ln = jnp.full((b,), L, jnp.int32)
        ms = device_ms(lambda q, k, v, l: decode_attention(q, k, v, l, logits_soft_cap=cap), q, k, v, ln)
        print(f"    perf {tag:16s} {name:36s} {ms * 1e3:8.1f} us {2 * b * L * K * H * 2 / ms / 1e6:6.0f} GB/s", flush=True)


def perf_prefill(tag):
    for H in (128, 256):
        ks = jax.random.split(jax.random.key(3), 3)
        q = jax.random.normal(ks[0], (1, 2048, 8, H), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, 2048, 4, H), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, 2048, 4, H), jnp.bfloat16)
        ms = device_ms(lambda q, k, v: attention(q, k, v), q, k, v)
        print(f"    prefill {tag:16s} B1 T2048 H{H} N8 K4 {ms * 1e3:8.1f} us", flush=True)


def part_b(variants):
    print("== part B: decode vs prefill (elements equal, sequences equal) ==", flush=True)
    for tag in variants:
        perf_only = tag.startswith("p:")
        tag = tag.removeprefix("p:")
        rows, nw, ns, mode = tag.split("-")
        rows, nw, ns = int(rows[1:]), int(nw[1:]) or None, int(ns[1:]) or None
        set_variant(rows, nw, ns, mode)
        res = []
        try:
            for dt in (() if perf_only else (jnp.float32, jnp.float16, jnp.bfloat16)):
                for H in (64, 128, 256):
                    e, n, sq, ns_ = dec_vs_prefill(dt, H)
                    res.append(f"{jnp.dtype(dt).name[:4]}/{H}:{sq}/{ns_}" + ("" if e == n else f"({n - e}el)"))
            print(f"  {tag:16s} " + " ".join(res) + f"   [{time.time() - T0:.0f}s]", flush=True)
            perf(tag)
            if mode != "sum" or tag.startswith("r64"):
                perf_prefill(tag)
        except Exception as e:  # noqa: BLE001
            print(f"  {tag} ERR {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "ab"
    if "a" in what:
        part_a()
    if "b" in what:
        part_b(sys.argv[2].split(",") if len(sys.argv) > 2 else
               ["r64-w0-s0-sum", "r16-w1-s0-sum", "r16-w2-s0-sum", "r16-w4-s2-sum", "r16-w1-s2-fma",
                "r16-w4-s2-fma", "r64-w0-s0-fma"])
    print(f"done {time.time() - T0:.0f}s", flush=True)
