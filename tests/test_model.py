"""Gemma model: batch / vmap invariance (bitwise), XLA negative control, float32 upcast, presets."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import detjax.nn as dnn
from detjax.models import GemmaConfig, Transformer


def _bits(x):
    a = np.asarray(x)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _beq(a, b):
    return np.asarray(a).shape == np.asarray(b).shape and np.array_equal(_bits(a), _bits(b))


fwd = nnx.jit(lambda m, t: m(t))
TOKS = jnp.asarray(np.random.RandomState(0).randint(0, 256, (3, 12)), jnp.int32)


@pytest.fixture(scope="module")
def model():
    return Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batched(model):
    return np.asarray(fwd(model, TOKS))


def test_forward_shape(batched):
    assert batched.shape == (3, 12, 256) and batched.dtype == np.float32
    assert np.isfinite(batched).all()
    assert np.abs(batched).max() <= 30.0  # final soft-cap


def test_batch_invariance(model, batched):
    for i in range(3):
        assert _beq(fwd(model, TOKS[i:i + 1])[0], batched[i]), f"row {i}"


def test_vmap_equals_unbatched(model, batched):
    g, s = nnx.split(model)
    out = jax.jit(jax.vmap(lambda t: nnx.merge(g, s)(t[None])[0]))(TOKS)
    assert _beq(out, batched)


def test_xla_impl_close_and_same_params(model, batched):
    mx = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0), impl="xla")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(mx))):
        assert _beq(a, b)
    lx = np.asarray(fwd(mx, TOKS))
    err = np.abs(lx - batched).max()
    print(f"\n[detjax vs xla f32 logits] max abs diff {err:.3e}")
    assert err < 1e-4


def test_implementation_context(model):
    m0 = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0))  # impl=None: follows the context
    mx = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0), impl="xla")
    # The context is read at trace time and is not part of jit's cache key: use fresh jit wrappers.
    with dnn.implementation("xla"):
        assert dnn.current_impl() == "xla"
        a = nnx.jit(lambda m, t: m(t))(m0, TOKS)
    assert _beq(a, nnx.jit(lambda m, t: m(t))(mx, TOKS))
    assert dnn.current_impl() == "detjax"
    with pytest.raises(ValueError, match="impl"):
        Transformer(GemmaConfig.tiny(), impl="cuda")


def test_negative_control_xla_breaks_batch_invariance():
    """Plain XLA ops are not batch-invariant on this CPU (measured: the first row of a 16-row batch
    differs from the same row alone by ~1e-5). If some platform happened to make them invariant,
    the test skips (that would be a weaker control, not a detjax failure)."""
    mx = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(0), impl="xla")
    toks = jnp.asarray(np.random.RandomState(1).randint(0, 256, (16, 8)), jnp.int32)
    full = np.asarray(fwd(mx, toks))
    differs = [not _beq(fwd(mx, toks[:n])[:1], full[:1]) for n in (1, 4)]
    print(f"\n[negative control] xla row-0 differs for batch 1/4 vs 16: {differs}")
    if not any(differs):
        pytest.skip("XLA happened to be batch-invariant on this platform for this config")
    assert any(differs)


def test_upcast_bf16_accuracy():
    cfg = GemmaConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    m_bf = Transformer(cfg, rngs=nnx.Rngs(0))
    m_up = Transformer(cfg.with_upcast(), rngs=nnx.Rngs(0))
    m_ref = Transformer(cfg.with_upcast(), rngs=nnx.Rngs(0), impl="xla")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(m_up, nnx.Param)))
    ref = np.asarray(fwd(m_ref, TOKS))
    lb, lu = np.asarray(fwd(m_bf, TOKS)), np.asarray(fwd(m_up, TOKS))
    assert lb.dtype == lu.dtype == np.float32

    def rel(x):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

    eb, eu = rel(lb), rel(lu)
    agree_b = float((lb.argmax(-1) == ref.argmax(-1)).mean())
    agree_u = float((lu.argmax(-1) == ref.argmax(-1)).mean())
    print(f"\n[upcast] rel. logit error vs f32 XLA reference: bf16 activations {eb:.3e} "
          f"(argmax agreement {agree_b:.3f}), f32 upcast {eu:.3e} (argmax agreement {agree_u:.3f})")
    assert eu < 1e-5 and eb > 10 * eu
    # the upcast model stays batch invariant
    assert _beq(fwd(m_up, TOKS[1:2])[0], lu[1])


def test_presets_abstract():
    expect = {"gemma1_2b": 2.5e9, "gemma2_2b": 2.6e9, "gemma3_1b": 1.0e9}
    for name, n_expected in expect.items():
        cfg = getattr(GemmaConfig, name)()
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert 0.8 * n_expected < n < 1.25 * n_expected, (name, n)
    c3 = GemmaConfig.gemma3_1b()
    assert c3.use_qk_norm and [c3.layer_kind(i) for i in range(6)] == ["local"] * 5 + ["global"]
    assert GemmaConfig.small().num_layers == 4


def test_bad_inputs(model):
    with pytest.raises(TypeError, match="tokens"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="config"):
        Transformer({"d_model": 4})
    with pytest.raises(ValueError, match="num_heads"):
        GemmaConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        GemmaConfig.tiny(dtype="int8")
    with pytest.raises(ValueError, match="attention_pattern"):
        GemmaConfig.tiny(attention_pattern=("sliding",))
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 0)
