#!/usr/bin/env bash
# The project's entry point: `./run.sh demo [--out DIR]` runs the main job, `./run.sh test` the tests,
# `./run.sh lint` the checks (ruff lint and format, mypy on the package).
# Each call makes (or reuses) a local virtual environment in .venv with the CPU build of torch,
# the package and its extras, then runs the command inside it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

ensure_env() {
  local stamp="$VENV/.installed"
  local want
  want="$(cat pyproject.toml setup.cfg setup.py | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first: a bare torch requirement with no torch installed would pull the CUDA build.
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_env
    exec "$VENV/bin/python" -m captum_influence demo "$@"
    ;;
  test)
    ensure_env
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  lint)
    ensure_env
    status=0
    "$VENV/bin/ruff" check . || status=1
    "$VENV/bin/ruff" format --check . || status=1
    "$VENV/bin/mypy" captum_influence || status=1
    exit "$status"
    ;;
  *)
    echo "usage: ./run.sh demo [--out DIR] | ./run.sh test [pytest args] | ./run.sh lint" >&2
    exit 2
    ;;
esac
