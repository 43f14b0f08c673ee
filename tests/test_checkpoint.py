"""Checkpoints: bitwise round trip; missing / truncated / corrupted / mismatched ones rejected with
clear CheckpointErrors and left untouched; a different environment only warns."""

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import reliability_module
from detjax import checkpoint as ck
from detjax.models import GemmaConfig, Transformer

fwd = nnx.jit(lambda m, t: m(t))
TOKS = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = (hashlib.sha256(fh.read()).hexdigest(),
                                                 os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Transformer(GemmaConfig.tiny(), rngs=nnx.Rngs(1))
    path = str(tmp_path_factory.mktemp("ck") / "model")
    ck.save(path, model)
    return path, model


def _copy(saved, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(saved[0], dst)
    return dst


def test_round_trip_bitwise(saved):
    path, model = saved
    before = _snapshot(path)
    restored = ck.restore(path)
    assert _snapshot(path) == before
    assert restored.config == model.config
    assert np.array_equal(_bits(fwd(restored, TOKS)), _bits(fwd(model, TOKS)))
    assert ck.param_hashes(restored) == ck.param_hashes(model)
    fp = json.load(open(os.path.join(path, "fingerprint.json")))
    assert set(fp["environment"]) == {"jax_version", "backend", "device_kind", "kernels_version",
                                      "impl"}


def test_save_refuses_existing(saved):
    with pytest.raises(ck.CheckpointError, match="already exists"):
        ck.save(saved[0], saved[1])


def _expect_error(path, match):
    before = _snapshot(path)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.restore(path)
    assert _snapshot(path) == before, "restore modified the checkpoint files"


def test_missing_dir(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint directory"):
        ck.restore(str(tmp_path / "nope"))


@pytest.mark.parametrize("name,match", [("config.json", "missing config.json"),
                                        ("COMPLETE", "incomplete"),
                                        ("params.sha256.json", "missing params.sha256.json")])
def test_missing_files(saved, tmp_path, name, match):
    p = _copy(saved, tmp_path)
    os.remove(os.path.join(p, name))
    _expect_error(p, match)


def test_truncated_json(saved, tmp_path):
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "config.json")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    _expect_error(p, "config.json is corrupted")


def _data_files(p):
    """Orbax's array data files, smallest first (the bad-input table corrupts the same files)."""
    return reliability_module()._ckpt_data_files(p)


def test_truncated_param_data(saved, tmp_path):
    p = _copy(saved, tmp_path)
    for f in _data_files(p):
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 3])
    _expect_error(p, "orbax could not read|does not match its recorded sha256")


def test_corrupted_param_hash(saved, tmp_path):
    """A parameter whose bytes do not match the recorded sha256 is named in the error."""
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "params.sha256.json")
    h = json.load(open(f))
    name = sorted(h)[3]
    h[name]["sha256"] = "0" * 64
    json.dump(h, open(f, "w"))
    _expect_error(p, f"parameter {name} does not match")


def test_mismatched_config_shape(saved, tmp_path):
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "config.json")
    meta = json.load(open(f))
    meta["config"]["hidden_dim"] = 96
    json.dump(meta, open(f, "w"))
    _expect_error(p, "mismatched config")


def test_mismatched_config_invalid(saved, tmp_path):
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "config.json")
    meta = json.load(open(f))
    meta["config"]["num_heads"] = 3
    json.dump(meta, open(f, "w"))
    _expect_error(p, "valid GemmaConfig")


def test_same_env_different_logits(saved, tmp_path):
    """Same shapes, different behaviour (soft-cap changed): the fingerprint catches it."""
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "config.json")
    meta = json.load(open(f))
    meta["config"]["final_logits_soft_cap"] = 5.0
    json.dump(meta, open(f, "w"))
    _expect_error(p, "probe logits differ")


def test_different_environment_warns(saved, tmp_path):
    p = _copy(saved, tmp_path)
    f = os.path.join(p, "fingerprint.json")
    fp = json.load(open(f))
    fp["environment"]["jax_version"] = "0.0.1"
    fp["environment"]["device_kind"] = "NVIDIA H100"
    fp["logits_sha256"] = "1" * 64
    json.dump(fp, open(f, "w"))
    before = _snapshot(p)
    with pytest.warns(ck.CheckpointEnvironmentWarning, match="jax_version.*0.0.1"):
        m = ck.restore(p)
    assert _snapshot(p) == before
    assert isinstance(m, Transformer)
