#!/usr/bin/env bash
# detjax developer entry point. Sets up .venv on first use (finds a Python >= 3.12 by itself).
#   ./run.sh demo [ARGS]    set up, then run `detjax demo` (plain XLA vs detjax, CPU by default)
#   ./run.sh test [ARGS]    set up, then run the test suite (pytest ARGS)
#   ./run.sh setup          only set up
#   ./run.sh gpu            the GPU suite (tests compiled on the GPU + benchmarks); see scripts/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv

find_python() {
  local c cands=()
  [ -n "${DETJAX_PYTHON:-}" ] && cands+=("$DETJAX_PYTHON")
  cands+=(python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root 2>/dev/null || true)
    for c in "$root"/versions/3.1[2-9]*/bin/python3; do [ -x "$c" ] && cands+=("$c"); done
  fi
  for c in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do [ -x "$c" ] && cands+=("$c"); done
  for c in "${cands[@]}"; do
    if "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      command -v "$c" 2>/dev/null || echo "$c"; return 0
    fi
  done
  echo "detjax: no Python >= 3.12 found (tried: ${cands[*]}). Set DETJAX_PYTHON=/path/to/python3.12." >&2
  return 1
}

setup() {
  local stamp="$VENV/.detjax-setup" want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    local py; py=$(find_python)
    echo "detjax: creating $VENV with $py ($("$py" --version 2>&1))" >&2
    rm -rf "$VENV"; "$py" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" >&2
  echo "$want" > "$stamp"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/detjax" demo "$@" ;;
  test) setup
        # xdist workers: the CPU count, at least 2 (the 8-device subprocess test overlaps the rest),
        # at most 4 (each worker compiles its own programs: memory)
        workers=$("$VENV/bin/python" -c 'import os; print(max(2, min(4, os.cpu_count() or 2)))')
        exec "$VENV/bin/python" -m pytest -q -n "$workers" "$@" ;;
  gpu) exec bash scripts/gpu_suite.sh "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup|gpu} [args]" >&2; exit 2 ;;
esac
