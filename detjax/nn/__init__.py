"""detjax.nn: Flax NNX layers whose arithmetic runs on ``detjax.ops`` (fixed reduction order).

The same layers run on plain XLA ops with ``impl='xla'`` (constructor) or inside
``with detjax.nn.implementation('xla'):`` (for layers built with ``impl=None``), with the very
same parameters: use it for comparisons and negative controls.
"""

from detjax.nn._impl import current_impl, implementation
from detjax.nn._layers import (Attention, Block, Einsum, Embed, FeedForward, Linear, RMSNorm,
                               apply_rope, set_implementation)

__all__ = ["Linear", "Einsum", "Embed", "RMSNorm", "Attention", "FeedForward", "Block",
           "apply_rope", "implementation", "current_impl", "set_implementation"]
