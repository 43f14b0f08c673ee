"""detjax.parallel: DP / TP / DP x TP forward, gradients and generation bitwise equal to one device.

The multi-device checks need 8 host devices, which must be configured before jax starts, so they
run ``scripts/multidevice_check.py --quick --json`` once in a subprocess (with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and assert on its JSON rows. The HLO
helper is also tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from detjax import parallel as par

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_multidevice_check():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("DETJAX_BACKEND", "interpret")
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")   # the 8-device check is a CPU check
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "multidevice_check.py"),
                        "--quick", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from multidevice_check (rc {p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    print(p.stdout)
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    """The subprocess's JSON report, computed once per pytest run. Under pytest-xdist a module
    fixture runs once per worker that receives one of this module's tests (2-3 min each on two
    CPU cores): the first worker runs the check and stores the report in the run's shared
    temporary directory, another worker waits for it and reads it. (tests/conftest.py also puts
    this module first in the collection, so that one worker gets all of it.)"""
    if not hasattr(request.config, "workerinput"):
        return _run_multidevice_check()
    import fcntl   # xdist workers: POSIX only (the CPU CI and the GPU machines)
    uid = request.config.workerinput["testrunuid"]   # one per pytest run, shared by its workers
    shared = tmp_path_factory.getbasetemp().parent / f"detjax_multidevice_report_{uid}.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.exists():
            return json.loads(shared.read_text())
        rep = _run_multidevice_check()
        shared.write_text(json.dumps(rep))
        return rep


def _rows(rep, prefix):
    rows = [r for r in rep["rows"] if r["check"].startswith(prefix)]
    assert rows, f"no rows for {prefix!r}"
    return rows


def _assert_ok(rows):
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)


def test_eight_devices(report):
    assert report["devices"] == 8


def test_dp_forward_bitwise(report):
    rows = _rows(report, "dp_forward")
    assert {r["degree"] for r in rows} >= {2, 8}
    _assert_ok(rows)


def test_tp_forward_bitwise_no_float_allreduce(report):
    rows = _rows(report, "tp_forward")
    assert {r["degree"] for r in rows if r["check"] == "tp_forward"} == {1, 2, 4, 8}
    _assert_ok(rows)
    assert all("float all-reduces: 0" in r["note"] for r in rows if r["note"])


def test_dp_x_tp_forward_bitwise(report):
    _assert_ok(_rows(report, "dp2xtp4"))


def test_gradients_run_to_run_and_across_dp(report):
    _assert_ok(_rows(report, "grad_run_to_run"))
    rows = _rows(report, "grad_dp_vs_single")
    assert 8 in {r["degree"] for r in rows}
    _assert_ok(rows)


def test_tp_gradients_bitwise_every_degree(report):
    """TP training (custom VJPs that gather instead of splitting a contraction): loss and every
    parameter gradient bitwise equal to one device for TP 1, 2, 4, 8, run to run, and no float
    all-reduce in the compiled programs."""
    rows = _rows(report, "tp_grad")
    assert {r["degree"] for r in rows if r["check"] == "tp_grad"} == {1, 2, 4, 8}
    _assert_ok(rows)
    assert all("float all-reduces: 0" in r["note"] for r in rows
               if r["check"] == "tp_grad" and r["degree"] != 1)
    assert 8 in {r["degree"] for r in rows if r["check"] == "tp_grad_run_to_run"}


def test_tp_train_step_bitwise(report):
    rows = _rows(report, "tp_train_step")
    assert {r["degree"] for r in rows} == {8}
    _assert_ok(rows)


def test_negative_control_autodiff_tp_grad_differs(report):
    """Plain autodiff of a column-parallel projection inserts Megatron's psum: caught by the HLO
    check, and its input gradient's bits differ from one device."""
    rows = _rows(report, "neg_autodiff_tp_grad_mm")
    assert {r["degree"] for r in rows} == {2, 4, 8}
    assert all(not r["equal"] for r in rows), "psum gradient unexpectedly bitwise equal"
    assert all("float all-reduces: 0" not in r["note"] for r in rows)
    _assert_ok(rows)


def test_tp_training_argument_checks():
    """In-process (one device): the TP training entry points reject what they cannot do."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from detjax.models.gemma import GemmaConfig, Transformer

    model = Transformer(GemmaConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
    mesh = par.make_mesh(1, 1)
    toks = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="mode='gather'"):
        par.tp_value_and_grad(par.tensor_parallel(model, mesh, mode="psum"), toks)
    pm = par.tensor_parallel(model, mesh)
    with pytest.raises(ValueError, match="multiple of block_size"):
        par.tp_value_and_grad(pm, toks, block_size=3)
    with pytest.raises(ValueError, match="seq >= 2"):
        par.tp_value_and_grad(pm, toks[:, :1])
    with pytest.raises(ValueError, match="grad_reduce"):
        par.tp_value_and_grad(pm, toks, grad_reduce="tree")
    with pytest.raises(TypeError, match="ParallelTransformer"):
        par.tp_value_and_grad(model, toks)
    # unshard gives back the very parameters
    for a, b in zip(jax.tree.leaves(nnx.state(par.unshard(pm), nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param))):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert jnp.asarray(par._dedupe(jnp.arange(8).repeat(4), 0, 4)).tolist() == list(range(8))


def test_generation_dp_tp_bitwise(report):
    for p in ("gen_greedy_dp", "gen_greedy_tp", "gen_sampled_dp", "gen_sampled_tp"):
        _assert_ok(_rows(report, p))


def test_negative_control_psum_differs(report):
    mm = _rows(report, "neg_psum_rowparallel_mm")
    assert all(not r["equal"] for r in mm), "psum split-K matmul unexpectedly bitwise equal"
    assert all("float all-reduces: 0" not in r["note"] for r in mm)
    _assert_ok(_rows(report, "neg_psum_tp_forward"))


def test_float_allreduce_detector():
    hlo = """
  %all-reduce.1 = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %p), channel_id=1, to_apply=%add
  %all-reduce.2 = s32[] all-reduce(s32[] %i), channel_id=2, to_apply=%add.i
  %ag = f32[8,8]{1,0} all-gather(f32[4,8]{1,0} %p), dimensions={0}
  %ars = (bf16[2]{0}, bf16[2]{0}) all-reduce-start(bf16[2]{0} %a, bf16[2]{0} %b), to_apply=%add
"""
    bad = par.float_allreduces(hlo)
    assert len(bad) == 2 and "all-reduce.1" in bad[0] and "ars" in bad[1]
    with pytest.raises(AssertionError, match="floating-point all-reduce"):
        par.assert_no_float_allreduce(hlo)
    par.assert_no_float_allreduce("\n".join(ln for ln in hlo.splitlines()
                                            if "all-reduce.1" not in ln and "ars" not in ln))


def test_ordered_sum_is_sequential():
    import jax.numpy as jnp
    xs = jnp.asarray([1e8, 1.0, -1e8, 1.0], jnp.float32)
    # sequential: ((1e8 + 1) - 1e8) + 1 = 1 in f32; a pairwise tree would give 0
    assert float(par.ordered_sum(xs)) == 1.0
    assert float(par.ordered_sum(xs.astype(jnp.bfloat16))) == 1.0   # f32 accumulation


def test_gpu_tp_requires_autotune_off(monkeypatch):
    """TP on GPUs raises unless XLA_FLAGS turns XLA's autotuning off (warns with
    allow_xla_autotuning=True); CPU meshes and the flag pass silently."""
    import warnings
    from types import SimpleNamespace
    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")] * 2))
    cpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="cpu")] * 2))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.raises(RuntimeError, match="xla_gpu_autotune_level=0.*allow_xla_autotuning"):
        par._check_gpu_autotune(gpu, False)
    with pytest.warns(RuntimeWarning, match="allow_xla_autotuning=True"):
        par._check_gpu_autotune(gpu, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        par._check_gpu_autotune(cpu, False)
        monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
        par._check_gpu_autotune(gpu, False)
