"""Batch-invariant attention on Hopper through Mosaic GPU (wgmma, TMA, warp specialisation).

EXPERIMENTAL and opt-in (``detjax.experimental.mosaic_attention``): its reduction order is not
the Triton kernels' (``pallas_kernels/attention.py``), so its bits differ from ``detjax.ops.attention``;
within this module prefill, chunked prefill and decode give the same bits (decode runs the same
kernel). Forward only; bf16/f16; head dims up to 256; GPU with Mosaic GPU support (sm_90+).

The kernel is jax's ``jax.experimental.pallas.ops.gpu.attention_mgpu`` forward (two compute
warpgroups of 64 rows each, one memory warpgroup streaming K/V blocks through a 2-slot TMA
pipeline, ``approx_math``), changed to detjax's row semantics: the rows are detjax's packed
(token, query head) rows of one KV head (``attention.prepare``), every row carries its own key
interval ``[lo, hi)`` (causal by absolute positions, sliding windows, lengths: ``row_bounds``), and
each CTA of 128 rows walks the union of its rows' KV blocks.

Reduction order (see also ``pallas_kernels/order.py``)
----------------------------------------------------
* KV blocks of ``MGPU_ATTN_BLOCK_K`` (= 64) keys on an absolute grid anchored at key 0 (block
  ``j`` = keys ``[64 j, 64 j + 64)``), visited in ascending ``j``; **no splits** (one online
  softmax per row over all its blocks, prefill and decode alike).
* Per block, for a row: ``s = q . k`` (wgmma, f32 accumulation over the head dim in k-steps of 16),
  ``s = s * (scale * log2 e)`` (with a soft cap ``c``: ``(c log2 e) * tanh(s * scale / c)``), ``-inf``
  outside the row's interval; ``m' = max(m, rowmax(s))``; ``m_use = m'`` (0 while ``m'`` is
  ``-inf``); ``alpha = 2^(m - m_use)``, ``p = 2^(s - m_use)`` (``ex2.approx``); ``acc = acc * alpha``;
  ``l = l * alpha + rowsum(p)`` (Mosaic GPU's reduction of the 64 keys of the row: the same
  instruction sequence for every row); ``acc = acc + p.astype(dtype) @ v`` (wgmma accumulating into
  ``acc``). ``out = acc / l``, exactly 0 for a row with no valid key.
* A block with no valid key for a row changes nothing in that row for finite values
  (``alpha = 1``, ``p = 0``), so the union of intervals a CTA walks, and therefore the batch, the
  other rows and the cache's ``max_len``, never changes a row's bits.

Not covered (use ``detjax.ops.attention``): gradients; float32; non-finite values in a visited
block outside a row's interval (a NaN/inf past a sequence's length in the cache's last visited block
reaches the row as ``0 * NaN``: keep caches finite, e.g. zero-initialised); splits for long-cache
decode at small batch (one CTA walks the whole cache: B8 8k keys is 2.2x slower than the split
Triton decode, run s10-6).

GPU evidence (H100, runs s10-6/s10-7 in ``results/``, the kernel below as run there): accuracy
against float64 equal to the Triton kernel's (bf16: 0.0097 causal, 0.0084 window + soft cap +
lengths); batch invariance; decode through this kernel = prefill bitwise (6/6 positions across
block boundaries); prefill at 0.59-0.80x cuDNN (Triton kernel: 0.18-0.32x).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.order import MGPU_ATTN_BLOCK_K  # 64 keys; 128 was faster at head dim <= 128
# (0.64-0.84x cuDNN in run s10-7, batch-invariant) but its decode = prefill was not checked on the GPU

BLOCK_Q = 64          # rows per compute warpgroup; a CTA has two
CTA_ROWS = 2 * BLOCK_Q
MAX_HEAD_DIM = 256    # q, k and v slots of a [64, 256] tile fill 193 KB of the 227 KB of SMEM


def block_ranges(lo, hi, block_kv=MGPU_ATTN_BLOCK_K):
    """``[B, K, Rp/128, 2]`` int32: the KV blocks ``[start, end)`` touched by any row of each CTA of
    128 rows (empty: ``[0, 0)``)."""
    b, kh, rp = lo.shape
    lo = lo.reshape(b, kh, rp // CTA_ROWS, CTA_ROWS)
    hi = hi.reshape(b, kh, rp // CTA_ROWS, CTA_ROWS)
    ne = hi > lo
    start = jnp.min(jnp.where(ne, lo, 2 ** 30), axis=-1) // block_kv
    end = (jnp.max(jnp.where(ne, hi, 0), axis=-1) + block_kv - 1) // block_kv
    start = jnp.where(end > 0, start, 0)
    return jnp.stack([start, jnp.maximum(end, start)], axis=-1).astype(jnp.int32)


def mosaic_attention_call(qp, k, v, lo, hi, *, scale, soft_cap=None, block_kv=MGPU_ATTN_BLOCK_K,
                          steps=2):
    """The kernel on packed operands: ``qp [B, K, Rp, H]`` packed rows (``Rp`` a multiple of 128,
    ``H`` a multiple of 64), ``k, v [B, S, K, H]`` (``S`` a multiple of ``block_kv``), ``lo, hi
    [B, K, Rp]`` int32 row intervals. Returns ``o [B, K, Rp, H]`` in ``qp``'s dtype."""
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
