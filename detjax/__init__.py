"""detjax: bitwise-reproducible, batch-invariant JAX and Flax.

* ``detjax.ops``: matmul / dot_general / einsum / reductions / rms_norm / attention on Pallas kernels
  whose reduction order is fixed (documented in ``pallas_kernels/order.py``).
* ``detjax.deterministic(fn)`` / ``detjax.wrap(model)``: run any JAX/Flax function with XLA's
  order-dependent primitives replaced by detjax kernels.
* ``detjax.nn``, ``detjax.models.gemma``, ``detjax.generate``, ``detjax.checkpoint``: Gemma-style
  Flax NNX model, KV-cache generation, orbax checkpoints with a reproducibility fingerprint.
* ``detjax.backend``: which lowering runs the kernels (``DETJAX_BACKEND``).
"""

from pallas_kernels import backend
from pallas_kernels.backend import chosen_backend
from pallas_kernels.order import KERNELS_VERSION

from detjax import ops
from detjax.transform import deterministic, wrap
from detjax.generate import generate

__version__ = "0.1.0"

__all__ = ["ops", "backend", "chosen_backend", "deterministic", "wrap", "generate",
           "KERNELS_VERSION", "__version__"]
