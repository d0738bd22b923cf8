#!/usr/bin/env bash
# Rewrite constraints.txt: the newest releases that pyproject.toml allows (its test extras included), installed
# into a fresh environment as scripts/setup.sh installs them, then frozen.
#   bash scripts/update_constraints.sh && bash scripts/setup.sh --test && .venv/bin/python -m pytest -q
# Commit the new constraints.txt once the tests pass on it: it is what every fresh set-up installs.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PIPELINE_UNPINNED=1 VENV="$work/venv" bash scripts/setup.sh --test >&2
{
  echo "# The versions the tests passed on, installed by scripts/setup.sh on every fresh set-up (pyproject.toml"
  echo "# gives the ranges the code supports). Made by scripts/update_constraints.sh on $("$work/venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())')."
  # A local version label (torch's +cpu) is the build, not the release: torch==X matches X+cpu and the CUDA X.
  "$work/venv/bin/python" -m pip freeze --exclude-editable --all | grep -Ev '^(pip|setuptools|wheel)==' | sed -E 's/\+[A-Za-z0-9.]+$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins" >&2
