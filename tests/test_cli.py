"""The ``detjax`` command line: check, demo, bench (in process, through ``main``)."""

from __future__ import annotations

import json
import textwrap

import pytest

from detjax.cli import main

MODULE = "detjax_cli_testmod"


@pytest.fixture
def mod(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp
        from detjax import ops
        W = jax.random.normal(jax.random.key(1), (1024, 128), jnp.float32)
        def good(x):
            return ops.sum(x, axis=-1)
        def two(x, y):
            return x * 2.0 + y[:, :1]
        def bad(x):
            return jnp.dot(x, W)
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return MODULE


def _one_line_error(capsys, rc):
    out = capsys.readouterr()
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detjax: error:"), out.err
    assert "Traceback" not in out.err
    return lines[0]


def test_check_ok_text_and_json(mod, capsys):
    assert main(["check", f"{mod}:good", "--args-shape", "3,64", "--batch-sizes", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "batch" in out and "run-to-run" in out
    assert main(["check", f"{mod}:two", "--args-shape", "3,8", "--args-shape", "3,4",
                 "--batch-sizes", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True and rep["batch_sizes"] == [2] and rep["n_examples"] == 3
    assert set(rep["leaves"][0]) >= {"path", "shape", "dtype", "ok", "batch", "vmap", "run_to_run"}
    assert rep["leaves"][0]["shape"] == [8]


def test_check_not_invariant_exits_1(mod, capsys):
    # plain XLA dot: row 0 alone vs inside a batch of 8 (premise checked in test_check)
    rc = main(["check", f"{mod}:bad", "--args-shape", "8,1024", "--batch-sizes", "1,8",
               "--positions", "0", "--json"])
    rep = json.loads(capsys.readouterr().out)
    if rep["ok"]:
        pytest.skip("XLA's dot happens to be batch-invariant for this shape on this machine")
    assert rc == 1 and rep["leaves"][0]["batch"]["ok"] is False


@pytest.mark.parametrize("argv, words", [
    (["check", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["check", "MOD:nope"], "has no attribute 'nope'"),
    (["check", "MOD:NOT_CALLABLE"], "not callable"),
    (["check", "MOD"], "MODULE:FUNCTION"),
    (["check", "MOD:good", "--args-shape", "4,x"], "'x' is not an integer"),
    (["check", "MOD:good", "--args-shape", "4,,3"], "comma-separated"),
    (["check", "MOD:good", "--args-shape", "4,0"], ">= 1"),
    (["check", "MOD:two", "--args-shape", "4,8", "--args-shape", "3,4"], "leading"),
    (["check", "MOD:good", "--batch-sizes", "1,two"], "--batch-sizes"),
    (["check", "MOD:good", "--runs", "abc"], "--runs"),
    (["check", "MOD:good", "--positions", "-1"], "--positions"),
    (["check", "MOD:good", "--dtype", "float33"], "--dtype"),
    (["check", "MOD:two", "--args-shape", "4,8"], "cannot be called"),
])
def test_check_bad_input_one_line_exit_2(mod, capsys, argv, words):
    argv = [a.replace("MOD", mod) for a in argv]
    line = _one_line_error(capsys, main(argv))
    assert words in line


def test_check_debug_shows_traceback(mod):
    with pytest.raises(Exception, match="no_such_module_xyz"):
        main(["--debug", "check", "no_such_module_xyz:f"])
    with pytest.raises(Exception, match="no_such_module_xyz"):
        main(["check", "no_such_module_xyz:f", "--debug"])


def test_check_file_path(tmp_path, capsys):
    f = tmp_path / "standalone.py"
    f.write_text("def double(x):\n    return x * 2\n")
    assert main(["check", f"{f}:double", "--args-shape", "2,3", "--dtype", "int32",
                 "--batch-sizes", "1,3"]) == 0
    assert "OK" in capsys.readouterr().out


def test_demo_json(capsys):
    rc = main(["demo", "--model", "tiny", "--num-samples", "2", "--max-new-tokens", "2", "--prompt-len", "4",
               "--max-len", "16", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"device", "backend", "model", "num_samples", "max_new_tokens", "results"}
    assert rep["model"] == "tiny" and rep["num_samples"] == 2 and rep["max_new_tokens"] == 2
    assert [r["impl"] for r in rep["results"]] == ["xla", "detjax"]
    for r in rep["results"]:
        assert set(r) >= {"unique_completions", "first_divergence", "max_logprob_diff",
                          "bitwise_identical", "seconds", "completion"}
        assert len(r["completion"]) == 2
    assert rep["results"][1]["bitwise_identical"] is True


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--only" in capsys.readouterr().out


def test_demo_unknown_model(capsys):
    line = _one_line_error(capsys, main(["demo", "--model", "nope", "--num-samples", "1"]))
    assert "unknown model 'nope'" in line


def test_demo_num_samples_not_int(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--num-samples", "abc"])
    assert e.value.code == 2
    assert "--num-samples" in capsys.readouterr().err


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
