"""detjax: bitwise-reproducible, batch-invariant JAX and Flax.

* ``detjax.ops``: matmul / dot_general / einsum / reductions / rms_norm / attention on Pallas kernels
  whose reduction order is fixed (documented in ``pallas_kernels/order.py``).
* ``detjax.backend``: which lowering runs the kernels (``DETJAX_BACKEND``).
"""

from pallas_kernels import backend
from pallas_kernels.backend import chosen_backend
from pallas_kernels.order import KERNELS_VERSION

from detjax import ops

__version__ = "0.1.0"

__all__ = ["ops", "backend", "chosen_backend", "KERNELS_VERSION", "__version__"]
