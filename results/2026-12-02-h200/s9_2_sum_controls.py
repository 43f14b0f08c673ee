"""s9-2: shapes where plain XLA's row sum breaks batch invariance on this GPU (for the test's control)."""
import jax, jax.numpy as jnp, numpy as np
def bits(a): return np.asarray(a).view(np.uint32)
f = jax.jit(lambda x: jnp.sum(x, axis=-1))
for shape in [(64, 262144), (4096, 4096), (1024, 4096), (256, 65536), (33, 1000), (64, 4096), (8, 1 << 20), (128, 32768), (1000, 1000), (4096, 1024)]:
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    full = bits(f(x))
    res = []
    for m in (1, 2, 7, 33, 100, 1000):
        if m < shape[0]:
            res.append((m, bool((bits(f(x[:m])) != full[:m]).any())))
    print(shape, res, flush=True)
