"""The one place that picks how kernels run."""

import jax
import jax.numpy as jnp
import pytest

import detjax
from detjax import ops
from pallas_kernels import backend


def test_auto_picks_interpret_on_cpu_and_gpu_on_gpu(monkeypatch):
    monkeypatch.delenv("DETJAX_BACKEND", raising=False)
    expected = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")
    assert detjax.chosen_backend() == expected


def test_env_var_and_per_call_override(monkeypatch):
    monkeypatch.setenv("DETJAX_BACKEND", "interpret")
    assert detjax.chosen_backend() == "interpret"
    monkeypatch.setenv("DETJAX_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DETJAX_BACKEND='bogus'"):
        detjax.chosen_backend()
    # The per-call override wins over the environment.
    assert detjax.chosen_backend("interpret") == "interpret"
    assert ops.sum(jnp.ones((2, 3)), backend="interpret").tolist() == [3.0, 3.0]


def test_context_manager(monkeypatch):
    monkeypatch.delenv("DETJAX_BACKEND", raising=False)
    with backend.use("interpret") as chosen:
        assert chosen == "interpret" == detjax.chosen_backend()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU 'gpu' is valid")
def test_unavailable_hardware_backend_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="'gpu' was requested"):
        ops.matmul(jnp.ones((2, 3)), jnp.ones((3, 2)), backend="gpu")
