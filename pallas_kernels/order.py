"""The reduction orders of every detjax kernel, defined in one place.

Changing any constant here changes the bits detjax produces; ``KERNELS_VERSION`` must then be bumped
(it is stored in checkpoint fingerprints so that a restore can say why bits moved).

Common rule: **every reduction is anchored at position 0 of the reduced axis** and walks it in
pieces of a fixed size that depends on nothing but these constants. Padding or zero-extending the
axis only appends pieces that contribute exact zeros, so a row extended with zeros (masked keys,
padding) reduces to the same bits. Nothing depends on batch size, row position, or tile choice in
the non-reduced dimensions.

* Matmul (``pallas_kernels/matmul.py``): ``K`` is cut into tiles of ``MATMUL_BLOCK_K`` starting at
  k=0; one f32 accumulator per output element adds the tiles in ascending order. Inside a tile the
  product is the backend's matrix instruction (GPU: tensor-core MMA steps in ascending k; IEEE FMA
  for f32 at full precision; interpret: XLA's CPU dot on a tile of fixed shape). No split-K.
  On Hopper GPUs, bf16/f16 products with 16 < M <= 64 and wide or deep weights run the Mosaic GPU
  kernel ``pallas_kernels/matmul_mgpu.py`` instead: the same K tiles, accumulator and wgmma
  k-steps, so the same bits (GPU-tested; the dispatch is by shape and does not touch
  ``KERNELS_VERSION``).
* Row reductions (``pallas_kernels/reductions.py``): a row is read in chunks of
  ``REDUCE_CHUNK`` lanes starting at column 0; lane ``l`` of a chunk accumulates elementwise in
  ascending chunk order; the ``REDUCE_CHUNK`` lane partials are then combined by one fixed tree
  (the backend's reduction of a vector of exactly ``REDUCE_CHUNK`` elements, the same for every row).
* Attention (``pallas_kernels/attention.py``): online softmax over KV blocks on an absolute grid,
  block ``j`` covering keys ``[j * ATTN_BLOCK_K, (j + 1) * ATTN_BLOCK_K)``, visited in ascending
  ``j``; fully masked blocks are skipped (they would be exact no-ops). Blocks are grouped in splits
  of ``ATTN_SPLIT_K`` keys (split ``c`` = keys ``[c * ATTN_SPLIT_K, (c + 1) * ATTN_SPLIT_K)``, also
  anchored at key 0): each split runs its own online softmax from the empty state, and the split
  states are merged into the running total in ascending ``c`` by one guarded merge rule (an empty
  state merges as an exact no-op). Prefill merges at split boundaries inside one kernel; decode
  computes the splits in parallel programs and merges them, in the same order and with the same
  code, in a second Pallas kernel. Query rows never interact: rows of a ``ATTN_BLOCK_Q`` block are
  (token, query head) pairs of one KV head, each with its own absolute position and key interval.

Experimental, opt-in (``detjax.experimental.mosaic_attention``; not used by the models, ``generate``
or ``deterministic``, so not part of ``KERNELS_VERSION``):

* Mosaic GPU attention (``pallas_kernels/attention_mgpu.py``, Hopper): the same key intervals as
  the GPU attention, KV blocks of ``MGPU_ATTN_BLOCK_K_NARROW`` (= 128) keys for head dims <= 128
  and ``MGPU_ATTN_BLOCK_K`` (= 64) above, anchored at key 0 and visited in ascending order, **no
  splits** by default (one online softmax per row; decode runs the same kernel; opt-in
  ``splits=True``: the same ``ATTN_SPLIT_K`` splits as the GPU attention, each from the empty
  state, merged in ascending order by one guarded rule, prefill merging inside its CTAs and decode
  running the splits in parallel CTAs plus a merge kernel; not yet the default, see
  ``attention_mgpu.SPLITS``), logits in the base-2 domain
  with ``ex2.approx``, the mask applied to the max's input and to ``p`` (never inside the
  ``s -> p`` chain), the row sums reduced by Mosaic GPU's fixed per-row tree. Its bits differ from
  the Triton attention's. Rows are packed (token, query head) rows or one query head's tokens, in
  CTAs of one or two 64-row warpgroups, with the value columns split over up to 4 CTAs in
  small-batch decode: none of these changes a row's bits (each output column is a dot over the
  same keys; checked on the GPU).

TPU (``pallas_kernels/tpu.py``, backends ``tpu`` and ``tpu-interpret``) keeps the common rule but
not the GPU's tile shapes, so its bits differ from the GPU's and the CPU interpreter's:

* Matmul: grid ``(B, M/128, N/128, K/256)`` with K last and sequential; ``K`` is cut into tiles of
  ``tpu.TPU_BLOCK_K`` (= 256, not ``MATMUL_BLOCK_K``: Mosaic needs K blocks in multiples of 128)
  starting at k=0, added in ascending order into one f32 VMEM accumulator per output element; the
  tile product is one MXU dot of a fixed ``[128, 256] x [256, 128]`` tile (M/N/K zero-padded in the
  wrapper, so no shape ever changes the tile). f16 inputs are converted to f32 (exact) in the
  wrapper; ``precision='tf32'`` is rejected.
* Row reductions: the same ``REDUCE_CHUNK`` chunks, anchored at 0, accumulated elementwise in
  ascending order (rows padded with the identity in the wrapper instead of masked loads; 8 or 16
  rows per program, rows never interact); the final tree is three explicit halvings
  (1024 -> 512 -> 256 -> 128 lanes, ``acc[:, :w/2] + acc[:, w/2:]``) followed by the backend's
  cross-lane reduce of 128 lanes.
* Attention (``pallas_kernels/tpu_attention.py``): the GPU order with
  ``tpu_attention.TPU_ATTN_BLOCK_K`` (= 128) keys per KV block instead of ``ATTN_BLOCK_K`` (64: the
  key axis of the score tile is the lane axis, and 128 keys fill one vreg). Blocks ``[j * 128, (j + 1) * 128)`` anchored at key 0 are
  the last, sequential grid axis, visited in ascending ``j`` (blocks outside a q block's intervals
  skipped); splits are still ``ATTN_SPLIT_K`` keys anchored at 0 (8 blocks), each from the empty
  state, merged into the total in ascending order by the same guarded rule; rows are the GPU's
  ``ATTN_BLOCK_Q`` packed (token, query head) rows. The row statistics are kept lane-replicated
  (``[64, 128]``); the per-block max/sum reduce the 128 lanes of a vreg row. Decode runs the prefill
  kernel itself (no split-parallel programs + merge kernel: TPU grid steps run in sequence on a
  TensorCore), so decode = prefill by construction. Head dims are zero-padded to a multiple of 128;
  f16 runs as f32 (exact conversion; ``p`` is not rounded to f16 before ``p @ v``).
"""

KERNELS_VERSION = "1"

#: K tile of the matmul kernel: the unit of the ascending K accumulation.
MATMUL_BLOCK_K = 64

#: Lane width of the row-reduction kernels: the chunk every row is walked in.
REDUCE_CHUNK = 1024

#: KV block of the attention kernels (prefill, chunked prefill and decode share it).
ATTN_BLOCK_K = 64

#: Query block of the attention kernels (decode packs query heads/tokens into it).
ATTN_BLOCK_Q = 64

#: Attention split: keys ``[c * ATTN_SPLIT_K, (c + 1) * ATTN_SPLIT_K)`` form split ``c``, the unit
#: decode parallelises over and prefill merges at. A multiple of ``ATTN_BLOCK_K``.
ATTN_SPLIT_K = 1024

assert ATTN_SPLIT_K % ATTN_BLOCK_K == 0

#: KV block of the experimental Mosaic GPU attention (``pallas_kernels/attention_mgpu.py``) for head
#: dims above 128 (two pipeline slots of 256-wide K/V tiles leave no room for larger blocks).
MGPU_ATTN_BLOCK_K = 64

#: Its KV block for head dims <= 128.
MGPU_ATTN_BLOCK_K_NARROW = 128
