"""Save / restore a ``detjax.models.Transformer`` with orbax, verified bit for bit.

Layout of a checkpoint directory ``path``::

    path/state/             orbax StandardCheckpointer: the model's parameters (pure dict)
    path/config.json        the GemmaConfig
    path/params.sha256.json {parameter path: {"sha256", "dtype", "shape"}} of every parameter's bytes
    path/fingerprint.json   reproducibility fingerprint: sha256 of the float32 logits on a fixed probe
                            input, jax version, detjax backend, device kind, KERNELS_VERSION, impl
    path/COMPLETE           written last; a checkpoint without it is incomplete

``restore(path)`` rebuilds the model abstractly (``nnx.eval_shape``), restores the parameters into
it, checks every parameter hash and the fingerprint, and only then returns it. Any failure raises
``CheckpointError`` (a ``ValueError``) and never writes to ``path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["save", "restore", "CheckpointError", "CheckpointEnvironmentWarning", "fingerprint",
           "param_hashes"]

FORMAT_VERSION = 1
_FILES = ("config.json", "params.sha256.json", "fingerprint.json", "COMPLETE")
#: The fixed probe input of the fingerprint: token ids ``(i * 7 + 3) % vocab``.
PROBE_SHAPE = (2, 8)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not match its recorded hashes."""


class CheckpointEnvironmentWarning(UserWarning):
    """The checkpoint was fingerprinted in a different environment; bits may legitimately differ."""


def _path_str(path_tuple) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path_tuple)


def _flat_params(model):
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {_path_str(p): v for p, v in flat}, pure


def param_hashes(model) -> dict:
    """``{path: {"sha256", "dtype", "shape"}}`` of every parameter's raw bytes."""
    out = {}
    for name, v in _flat_params(model)[0].items():
        a = np.ascontiguousarray(np.asarray(v))
        out[name] = {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "dtype": str(a.dtype),
                     "shape": list(a.shape)}
    return out


def _probe_tokens(vocab):
    n = PROBE_SHAPE[0] * PROBE_SHAPE[1]
    return jnp.asarray((np.arange(n) * 7 + 3) % vocab, jnp.int32).reshape(PROBE_SHAPE)


def fingerprint(model) -> dict:
    """Reproducibility fingerprint of ``model`` in this environment."""
    import detjax
    from pallas_kernels.order import KERNELS_VERSION
    from detjax.nn._impl import current_impl
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, _probe_tokens(model.config.vocab_size)))
    return {
        "logits_sha256": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest(),
        "environment": {
            "jax_version": jax.__version__,
            "backend": detjax.chosen_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "kernels_version": KERNELS_VERSION,
            "impl": current_impl(getattr(model, "impl", None)),
        },
    }


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save(path, model, *, overwrite: bool = False) -> str:
    """Save ``model`` (a ``Transformer``) to the directory ``path``; returns the absolute path.

    Refuses an existing non-empty directory unless ``overwrite=True``.
    """
    import orbax.checkpoint as ocp
    from detjax.models.gemma import Transformer
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a detjax.models.Transformer; got {type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
        import shutil
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(path, exist_ok=True)
    _, pure = _flat_params(model)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "state"), pure)
    ckptr.wait_until_finished()
    ckptr.close()
    _write_json(os.path.join(path, "config.json"),
                {"format_version": FORMAT_VERSION, "model": "gemma",
                 "config": model.config.to_dict()})
    _write_json(os.path.join(path, "params.sha256.json"), param_hashes(model))
    _write_json(os.path.join(path, "fingerprint.json"), fingerprint(model))
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        f.write("ok\n")
    return path


def _read_json(path, name):
    p = os.path.join(path, name)
    try:
        with open(p) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing {name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupted ({e})") from None


def restore(path, *, check_fingerprint: bool = True, impl=None):
    """Rebuild and return the ``Transformer`` saved at ``path``, verified.

    Raises ``CheckpointError`` if anything is missing, unreadable, or a parameter's bytes differ
    from the recorded sha256; if the fingerprint's environment equals this one but the probe
    logits differ. Warns (``CheckpointEnvironmentWarning``) listing the differences if the
    environment differs. Never writes to ``path``.
    """
    import orbax.checkpoint as ocp
    from detjax.models.gemma import GemmaConfig, Transformer
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"checkpoint {path} is incomplete (no COMPLETE marker); it was not "
                              "fully saved")
    if not os.path.isdir(os.path.join(path, "state")):
        raise CheckpointError(f"checkpoint {path} is missing its parameter directory 'state/'")
    meta = _read_json(path, "config.json")
    hashes = _read_json(path, "params.sha256.json")
    fp = _read_json(path, "fingerprint.json")
    try:
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path}: unsupported format_version "
                                  f"{meta.get('format_version')!r} (expected {FORMAT_VERSION})")
        config = GemmaConfig.from_dict(meta["config"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: config.json does not describe a valid "
                              f"GemmaConfig ({type(e).__name__}: {e})") from None

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), impl=impl))
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    dev = jax.devices()[0]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(dev)), abs_params)
    want = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    if set(hashes) != want:
        raise CheckpointError(
            f"checkpoint {path}: its parameters do not match config.json's architecture "
            f"(missing: {sorted(want - set(hashes))[:5]}, unexpected: {sorted(set(hashes) - want)[:5]})")
    for name, leaf in ((_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]):
        h = hashes[name]
        if list(leaf.shape) != list(h.get("shape", [])) or str(leaf.dtype) != h.get("dtype"):
            raise CheckpointError(
                f"checkpoint {path}: parameter {name} is recorded as {h.get('dtype')}{h.get('shape')}"
                f" but config.json implies {leaf.dtype}{list(leaf.shape)} (mismatched config)")
    ckptr = ocp.StandardCheckpointer()
    try:
        restored = ckptr.restore(os.path.join(path, "state"), target)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: orbax could not read the parameters "
                              f"({type(e).__name__}: {str(e)[:500]})") from None
    finally:
        ckptr.close()

    # Verify every parameter's bytes before building anything.
    got = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    if set(got) != want:
        raise CheckpointError(f"checkpoint {path}: restored parameter set differs from the config")
    for name in sorted(want):
        a = np.ascontiguousarray(np.asarray(got[name]))
        if hashlib.sha256(a.tobytes()).hexdigest() != hashes[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: parameter {name} does not match its recorded "
                                  "sha256 (corrupted or modified)")

    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    model = nnx.merge(graphdef, state)
    # Non-parameter state (none today) must not be left abstract.
    for _, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        if isinstance(v, jax.ShapeDtypeStruct):
            raise CheckpointError(f"checkpoint {path}: the model has state that is not saved")

    if check_fingerprint:
        _check_fingerprint(path, fp, model)
    return model


def _check_fingerprint(path, fp, model):
    try:
        rec_env, rec_hash = dict(fp["environment"]), str(fp["logits_sha256"])
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: fingerprint.json is malformed") from None
    now = fingerprint(model)
    diffs = {k: (rec_env.get(k), v) for k, v in now["environment"].items() if rec_env.get(k) != v}
    if now["logits_sha256"] == rec_hash:
        return
    if not diffs:
        raise CheckpointError(
            f"checkpoint {path}: the probe logits differ from the recorded fingerprint although the "
            f"environment is the same ({now['environment']}): the model does not reproduce")
    lines = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diffs.items()))
    warnings.warn(f"checkpoint {path}: probe logits differ from the saved fingerprint; the "
                  f"environment differs ({lines})", CheckpointEnvironmentWarning, stacklevel=3)
