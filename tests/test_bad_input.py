"""Bad input, table-driven: every public function and CLI command, on invalid input, raises a clear
error naming the argument (or gives the documented IEEE / empty result), never a crash inside a
kernel; huge sizes are rejected before allocation; corrupted / foreign checkpoints are caught.

The table lives in ``scripts/reliability.py`` (``BAD_INPUTS``), which also writes it to
``results/reliability/bad_input.md`` (``--bad-input-table``). Entries with a ``defect`` describe a
known defect in a module owned elsewhere: they are ``xfail(strict=True)`` and flip when fixed.
"""


import pytest

from conftest import reliability_module

rel = reliability_module()


def _params():
    out = []
    for e in rel.BAD_INPUTS:
        marks = [pytest.mark.xfail(strict=True, reason=e.defect)] if e.defect else []
        out.append(pytest.param(e, id=e.id, marks=marks))
    return out


@pytest.mark.parametrize("entry", _params())
def test_bad_input(entry):
    row = rel.evaluate(entry)
    if entry.defect:   # evaluate() already judged it; fail here so that xfail(strict) can flip
        assert row["status"].startswith("XPASS"), f"{entry.id}: got {row['got']}"
    else:
        assert row["status"] == "ok", f"{entry.id}: expected {row['expected']}; got {row['got']}"


def test_table_covers_every_public_op():
    import warnings
    import detjax.ops
    named = {e.function for e in rel.BAD_INPUTS}
    assert set(rel.OPS) - {"deterministic"} <= named
    missing = set(detjax.ops.__all__) - named
    if missing:   # an op added after this table was written: flag it, do not break CI
        warnings.warn(f"bad-input table has no entry for the public ops {sorted(missing)}")
    for fn in ("deterministic", "wrap", "generate", "checkpoint.save", "checkpoint.restore", "cli"):
        assert fn in named
