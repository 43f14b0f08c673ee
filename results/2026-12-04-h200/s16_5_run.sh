#!/usr/bin/env bash
# Session 16, run 5 (device tool, from the repo root): which rows of plain XLA attention break, six
# fresh draws in one process (led to the control checking every row; see s16_5_control.py).
PYTHONPATH=$PWD timeout 90 python3 results/2026-12-04-h200/s16_5_control.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" | tail -8 | tee $OUT/s16_5_control.txt
