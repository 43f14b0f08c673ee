"""The Gemma-style model with ``GemmaConfig(attention_kernel='mosaic')``: the Mosaic GPU attention
(detjax.experimental) inside the model, generation and training.

On CPU: the option's argument checks and its clear refusals (no GPU; detjax.parallel). On a Hopper
GPU: the model's guarantees with the Mosaic kernel, bitwise: forward batch invariance, generation
of a needle prompt whatever the batch around it, generation logprobs equal to the teacher-forced
forward pass's log_softmax (decode = prefill through the whole model), run-to-run gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import detjax.ops as D
from detjax import experimental as X
from detjax.generate import generate
from detjax.models import GemmaConfig, Transformer

GPU, WHY = X.mosaic_available()
gpu_only = pytest.mark.skipif(not GPU, reason=f"Mosaic GPU kernel: {WHY}")


def _bits(x):
    a = np.asarray(x)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _config(head_dim=64, **kw):
    return GemmaConfig.small(dtype="bfloat16", param_dtype="bfloat16", head_dim=head_dim,
                             attention_kernel="mosaic", **kw)


def test_config_checks():
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        GemmaConfig.tiny(attention_kernel="cuda")
    with pytest.raises(ValueError, match="attention_kernel='mosaic' needs bfloat16/float16"):
        GemmaConfig.tiny(attention_kernel="mosaic")            # tiny is float32
    with pytest.raises(ValueError, match="attention_kernel='mosaic' needs bfloat16/float16"):
        _config().with_upcast()
    with pytest.raises(ValueError, match="head_dim <= 256"):
        _config(head_dim=320)
    c = _config()
    assert GemmaConfig.from_dict(c.to_dict()) == c
    assert GemmaConfig.from_dict({k: v for k, v in c.to_dict().items()
                                  if k != "attention_kernel"}).attention_kernel == "triton"


def test_attention_layer_checks_the_kernel_name():
    from detjax.nn import Attention
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        Attention(32, 4, 2, 16, attention_kernel="flash", rngs=nnx.Rngs(0))


@pytest.mark.skipif(GPU, reason="checks the refusal off a Hopper GPU")
def test_refuses_clearly_without_a_hopper_gpu():
    model = Transformer(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="Hopper GPU"):
        model(jnp.zeros((1, 8), jnp.int32))
    # the same model on XLA ops ignores the kernel choice: it traces through (abstractly: the
    # model's init and forward as shapes only, nothing compiled or run)
    xla = nnx.eval_shape(lambda: Transformer(_config(), rngs=nnx.Rngs(0), impl="xla"))
    graphdef, state = nnx.split(xla)
    out = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, jnp.zeros((1, 8), jnp.int32))
    assert out.shape == (1, 8, 512)


def test_parallel_refuses_the_mosaic_kernel():
    from detjax import parallel
    model = Transformer(_config(), rngs=nnx.Rngs(0))
    mesh = parallel.make_mesh(1, 1)
    with pytest.raises(NotImplementedError, match="attention_kernel='mosaic'"):
        parallel.data_parallel(model, mesh)
    with pytest.raises(NotImplementedError, match="attention_kernel='mosaic'"):
        parallel.tensor_parallel(model, mesh)


# ------------------------------------------------------------------------------------------------
# GPU

NEEDLE = [17, 3, 250, 9, 41, 77, 5]
OTHERS = [[5, 6, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108], [33], [2, 4, 8, 16, 32, 64, 128]]
NEW = 8


@pytest.fixture(scope="module", params=[64, 256], ids=["h64", "h256"])
def model(request):
    return Transformer(_config(request.param), rngs=nnx.Rngs(1))


@gpu_only
def test_gpu_forward_batch_invariance(model):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 512, (5, 200)), jnp.int32)
    f = nnx.jit(lambda m, t: m(t))
    full = _bits(f(model, tokens))
    for i in (0, 2, 4):
        assert np.array_equal(full[i], _bits(f(model, tokens[i:i + 1]))[0]), i
    assert np.array_equal(full, _bits(f(model, tokens)))


@gpu_only
def test_gpu_generation_needle_and_decode_equals_prefill(model):
    alone = generate(model, [NEEDLE], NEW, sequence_ids=[7])
    prompts = [OTHERS[0], NEEDLE, OTHERS[1], OTHERS[3]]     # the needle between longer and shorter
    r = generate(model, prompts, NEW, sequence_ids=[100, 7, 101, 102])
    np.testing.assert_array_equal(r.tokens[1], alone.tokens[0])
    assert np.array_equal(_bits(r.logprobs[1]), _bits(alone.logprobs[0]))
    gen, lp = alone.tokens[0], alone.logprobs[0]
    seq = np.concatenate([NEEDLE, gen]).astype(np.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seq[None]))
    full = np.asarray(D.log_softmax(logits, axis=-1))[0]
    pos = np.arange(len(NEEDLE) - 1, len(NEEDLE) - 1 + len(gen))
    assert np.array_equal(_bits(full[pos, gen]), _bits(lp))


@gpu_only
def test_gpu_gradients_run_to_run(model):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 130)), jnp.int32)

    def loss(m, t):
        lp = D.log_softmax(m(t[:, :-1]), axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, t[:, 1:, None], axis=-1))

    g = nnx.jit(nnx.grad(loss))
    a = jax.tree.leaves(nnx.state(g(model, tokens)))
    b = jax.tree.leaves(nnx.state(g(model, tokens)))
    assert all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in a)
