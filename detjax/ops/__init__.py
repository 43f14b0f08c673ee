"""detjax.ops: jnp/lax-shaped operations with a fixed, batch-invariant reduction order.

Every function takes an optional keyword ``backend=`` (``'auto'``, ``'gpu'``, ``'tpu'``,
``'interpret'``, ``'tpu-interpret'``) overriding ``DETJAX_BACKEND``.
"""

from detjax.ops._attention import attention, decode_attention
from detjax.ops._elementwise import isolated
from detjax.ops._gather import embedding_lookup
from detjax.ops._linalg import dot_general, einsum, matmul
from detjax.ops._reductions import (argmax, argmin, log_softmax, logsumexp, max, mean, min,
                                    rms_norm, softmax, sum)
from detjax.ops._scan import cumlogsumexp, cummax, cummin, cumsum

__all__ = ["matmul", "dot_general", "einsum", "sum", "mean", "max", "min", "argmax", "argmin",
           "logsumexp", "softmax", "log_softmax", "rms_norm", "cumsum", "cumlogsumexp", "cummax",
           "cummin", "attention", "decode_attention", "isolated", "embedding_lookup"]
