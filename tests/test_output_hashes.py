"""``scripts/output_hashes.py --compare``: the cross-device bit check reports every row and fails
on a row whose bits differ (the performance issue's H100 = H200 rule rests on it)."""

from __future__ import annotations

import json

from conftest import script_module

oh = script_module("output_hashes")


def test_compare_reports_same_differs_and_new(capsys):
    old = {"device": "NVIDIA H200", "rows": {"a": "00ff", "b": "1234", "gone": "beef"}}
    assert oh.compare({"a": "00ff", "b": "1234", "c": "abcd"}, old, "old.json") == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "2 of 2 shared rows equal; 1 rows new" in out
    assert [line.split()[-1] for line in out.splitlines()[1:4]] == ["same", "same", "new"]

    assert oh.compare({"a": "00ff", "b": "9999"}, old, "old.json") == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "1 of 2 shared rows equal" in out


def test_json_written_by_a_run_compares_equal_to_itself(tmp_path, capsys):
    rows = {"matmul bf16 257x1000x520": "ce5076257ebf9eec", "sum f32": "cfad65d64b0737ea"}
    f = tmp_path / "h.json"
    f.write_text(json.dumps(dict(device="cpu", rows=rows)))
    assert oh.compare(rows, json.loads(f.read_text()), str(f)) == 0
    assert "2 of 2 shared rows equal" in capsys.readouterr().out
