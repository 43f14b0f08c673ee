"""s10-6: a probe for the Mosaic GPU port of detjax attention (not part of the package).

jax's ``attention_mgpu`` forward kernel (wgmma, TMA, two compute warpgroups + one memory
warpgroup), changed to detjax's semantics: rows are detjax's packed (token, query head) rows of one
KV head (``pallas_kernels.attention.prepare``), every row carries its own key interval ``[lo, hi)``
(causal by absolute positions, windows, lengths), and each CTA of 128 rows walks the union of its
rows' KV blocks (``rng``, computed outside), ascending, on the absolute 64-key grid, with no splits.
Questions: does it compile and run; what do the intervals cost against jax's plain causal kernel
and cuDNN; is it batch-invariant; does decode through the same kernel equal prefill bitwise.
"""
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.bench_kernels import device_ms
from pallas_kernels import attention as K

BLOCK_Q = 64          # rows per compute warpgroup; a CTA has two
CTA_ROWS = 2 * BLOCK_Q


def block_ranges(lo, hi, block_kv):
    """[B, K, Rp/128, 2]: the KV blocks touched by any row of each CTA (empty: [0, 0))."""
    b, kh, rp = lo.shape
    lo = lo.reshape(b, kh, rp // CTA_ROWS, CTA_ROWS)
    hi = hi.reshape(b, kh, rp // CTA_ROWS, CTA_ROWS)
    ne = hi > lo
    start = jnp.min(jnp.where(ne, lo, 2 ** 30), axis=-1) // block_kv
    end = (jnp.max(jnp.where(ne, hi, 0), axis=-1) + block_kv - 1) // block_kv
    start = jnp.where(end > 0, start, 0)
    return jnp.stack([start, jnp.maximum(end, start)], axis=-1).astype(jnp.int32)


def interval_attention(qp, k, v, lo, hi, *, scale, soft_cap=None, block_kv=64, steps=2):
    """qp [B, K, Rp, H] packed rows (Rp a multiple of 128), k/v [B, S, K, H], lo/hi [B, K, Rp]."""
    b, kh, rp, h = qp.shape
    dtype = qp.dtype
    assert rp % CTA_ROWS == 0 and k.shape[1] % block_kv == 0 and h % 64 == 0
    rng = block_ranges(lo, hi, block_kv)
    log2e = math.log2(math.e)

    def kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, out_ref, scoped):
        bi = lax.axis_index("batch")
        hd = lax.axis_index("heads")
        qi = lax.axis_index("q_seq")
        wg = lax.axis_index("wg")
        (qo_smem2, k_smem, v_smem, lo_smem2, hi_smem2), (k_bar, v_bar, q_bar, lo_bar, hi_bar), \
            (k_used, v_used), sched = scoped
        blk0 = rng_ref[bi, hd, qi, 0]
        nsteps = rng_ref[bi, hd, qi, 1] - blk0

        def sched_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lo_smem, hi_smem = qo_smem2.at[wg], lo_smem2.at[wg], hi_smem2.at[wg]
            row0 = qi * CTA_ROWS + wg * BLOCK_Q
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)], qo_smem, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lo_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)], lo_smem, lo_bar.at[wg])
            plgpu.copy_gmem_to_smem(hi_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)], hi_smem, hi_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(lo_bar.at[wg])
            plgpu.barrier_wait(hi_bar.at[wg])
            row_lo = plgpu.load(lo_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            row_hi = plgpu.load(hi_smem, layout=plgpu.Layout.WGMMA.reduce(1))
            lo_b = lax.broadcast_in_dim(row_lo, (BLOCK_Q, block_kv), [0])
            hi_b = lax.broadcast_in_dim(row_hi, (BLOCK_Q, block_kv), [0])
            m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((BLOCK_Q, h), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(nsteps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            pl.when(wg == 1)(sched_barrier)

            def kv_loop(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, jnp.array(steps, step.dtype))

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    sched_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                if soft_cap is None:
                    s = s * (scale * log2e)          # logits in the log2 domain
                else:
                    s = (soft_cap * log2e) * jnp.tanh(s * (scale / soft_cap))
                kidx = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                              layout=plgpu.Layout.WGMMA) + (blk0 + step) * block_kv
                valid = (kidx >= lo_b) & (kidx < hi_b)
                s = jnp.where(valid, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = step + 1

                    @pl.when(nxt < nsteps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.array(steps, nxt.dtype))])

                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, nsteps, kv_loop, (acc, m_i, l_i))
            pl.when(wg == 0)(sched_barrier)
            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            acc /= lax.broadcast_in_dim(l_safe, (BLOCK_Q, h), [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, hd, pl.ds(row0, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            for i in range(steps):
                @pl.when(i < nsteps)
                def _(i=i):
                    sl = (bi, pl.ds((blk0 + i) * block_kv, block_kv), hd)
                    plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[i], k_bar.at[i])
                    plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[i], v_bar.at[i])

            @pl.loop(0, jnp.maximum(nsteps - steps, 0))
            def _(step):
                tma_step = step + steps
                slot = lax.rem(step, jnp.array(steps, step.dtype))
                sl = (bi, pl.ds((blk0 + tma_step) * block_kv, block_kv), hd)
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
                plgpu.barrier_wait(v_used.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

    def entry(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, out_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (plgpu.SMEM((2, BLOCK_Q, h), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((steps, block_kv, h), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((steps, block_kv, h), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((2, BLOCK_Q), jnp.int32),
                plgpu.SMEM((2, BLOCK_Q), jnp.int32))
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, rng_ref, out_ref, args),
            smem,
            (plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(qp.shape, dtype),
        grid=(kh, rp // CTA_ROWS, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(qp, k, v, lo, hi, rng)


def detjax_semantics_attention(q, k, v, *, causal=True, window=None, soft_cap=None, q_positions=None,
                               kv_lengths=None, block_kv=64):
    """Public layout in and out: pack rows with detjax's own ``prepare``, run the probe kernel."""
    b, t, n, h = q.shape
    s = k.shape[1]
    qpos = K.default_q_positions(b, t, s) if q_positions is None else q_positions
    kvl = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths
    qp, kp, vp, lo, hi, _ = K.prepare(q, k, v, qpos, kvl, causal=causal, sliding_window=window)
    rp = qp.shape[2]
    rpp = -(-rp // CTA_ROWS) * CTA_ROWS
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rpp - rp), (0, 0)))
    lo, hi = (jnp.pad(a, ((0, 0), (0, rpp - rp))).reshape(b, 1, rpp) for a in (lo, hi))
    kh = k.shape[2]
    lo = jnp.broadcast_to(lo, (b, kh, rpp))
    hi = jnp.broadcast_to(hi, (b, kh, rpp))
    sp = -(-kp.shape[1] // block_kv) * block_kv
    kp, vp = (jnp.pad(a, ((0, 0), (0, sp - a.shape[1]), (0, 0), (0, 0))) for a in (kp, vp))
    o = interval_attention(qp, kp, vp, lo, hi, scale=h ** -0.5, soft_cap=soft_cap, block_kv=block_kv)
    return K.unpack_rows(o[:, :, :rp], t, n, h)


def bits(x):
    return np.asarray(x).view(np.uint16)


def main():
    key = jax.random.key(0)
    dt = jnp.bfloat16
    # 1. accuracy against detjax's Triton kernel, causal and window + soft-cap + lengths
    b, t, n, kh, h = 3, 700, 8, 2, 128
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dt)
    k = jax.random.normal(ks[1], (b, t, kh, h), dt)
    v = jax.random.normal(ks[2], (b, t, kh, h), dt)
    kvl = jnp.array([700, 650, 333], jnp.int32)
    for name, kw in [("causal", {}), ("window 100 + cap 30 + lengths",
                                      dict(window=100, soft_cap=30.0, kv_lengths=kvl))]:
        try:
            got = jax.jit(functools.partial(detjax_semantics_attention, **kw))(q, k, v)
            ref = K.attention_f64_reference(q, k, v, sliding_window=kw.get("window"),
                                            logits_soft_cap=kw.get("soft_cap"),
                                            kv_lengths=kw.get("kv_lengths"))
            trit = __import__("detjax").ops.attention(q, k, v, sliding_window=kw.get("window"),
                                                      logits_soft_cap=kw.get("soft_cap"),
                                                      kv_lengths=kw.get("kv_lengths"))
            mask = np.ones(got.shape, bool)
            if "kv_lengths" in kw:   # rows past a sequence's length are outside the comparison
                mask = (np.arange(t)[None, :] < np.asarray(kvl)[:, None])[:, :, None, None] & mask
            err = np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref))[mask])
            err_t = np.max(np.abs(np.asarray(trit, np.float64) - np.asarray(ref))[mask])
            print(f"accuracy {name}: max |probe - f64| {err:.4f}, max |detjax Triton - f64| {err_t:.4f}", flush=True)
        except Exception as e:
            print(f"accuracy {name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            raise
    # 2. batch invariance and decode = prefill through the same kernel
    f = jax.jit(detjax_semantics_attention)
    full = bits(f(q, k, v))
    one = bits(f(q[1:2], k[1:2], v[1:2]))
    print("batch invariance (row 1 of 3 == alone):", np.array_equal(full[1], one[0]), flush=True)
    ok = 0
    ts = [0, 63, 64, 65, 500, 699]
    for tt in ts:
        d = f(q[:, tt:tt + 1], k, v, q_positions=jnp.full((b, 1), tt, jnp.int32),
              kv_lengths=jnp.full((b,), tt + 1, jnp.int32))
        ok += np.array_equal(bits(d)[:, 0], full[:, tt])
    print(f"decode through the same kernel == prefill bitwise: {ok}/{len(ts)}", flush=True)
    # 3. speed: prefill against cuDNN and the Triton kernel; decode against the Triton decode
    for b, t, h, kh in [(1, 2048, 128, 1), (8, 2048, 128, 4), (1, 8192, 128, 1), (1, 2048, 256, 4),
                        (1, 8192, 256, 4)]:
        ks = jax.random.split(jax.random.fold_in(key, t + h + kh), 3)
        q = jax.random.normal(ks[0], (b, t, 8, h), dt)
        k = jax.random.normal(ks[1], (b, t, kh, h), dt)
        v = jax.random.normal(ks[2], (b, t, kh, h), dt)
        cud = device_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v, iters=10)
        pr = device_ms(lambda q, k, v: detjax_semantics_attention(q, k, v), q, k, v, iters=10)
        tr = device_ms(lambda q, k, v: __import__("detjax").ops.attention(q, k, v), q, k, v, iters=10)
        print(f"prefill B{b} T{t} H{h} K{kh}: cudnn {cud:.3f}  probe {pr:.3f}  triton {tr:.3f} ms"
              f"  | cudnn/probe {cud / pr:.2f}  cudnn/triton {cud / tr:.2f}", flush=True)
    for b, s, kh in [(8, 8192, 4), (64, 8192, 4), (8, 768, 4)]:
        ks = jax.random.split(jax.random.fold_in(key, b * s), 3)
        q = jax.random.normal(ks[0], (b, 1, 8, 128), dt)
        k = jax.random.normal(ks[1], (b, s, kh, 128), dt)
        v = jax.random.normal(ks[2], (b, s, kh, 128), dt)
        lens = jnp.full((b,), s, jnp.int32)
        pos = lens[:, None] - 1
        pr = device_ms(lambda q, k, v: detjax_semantics_attention(q, k, v, q_positions=pos, kv_lengths=lens),
                       q, k, v, iters=20)
        tr = device_ms(lambda q, k, v: __import__("detjax").ops.decode_attention(q, k, v, lens), q, k, v, iters=20)
        print(f"decode B{b} cache {s} K{kh}: probe {pr * 1e3:.1f} us  triton split decode {tr * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
