#!/usr/bin/env bash
# Session 16, run 4 (device tool, from the repo root): the attention negative control twice more,
# alone (it had failed in s16-2 and in the first of s16-3's three runs; passed both times here).
export PYTHONPATH=$PWD; for i in 1 2; do timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fusion.py::test_plain_xla_attention_control 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | grep -a "Error\|assert\|passed\|failed\|seed\|broken" | head -12; done | tee $OUT/s16_4_control.log
