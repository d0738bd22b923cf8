#!/usr/bin/env bash
# Create .venv and install the pipeline into it.
#   bash scripts/setup.sh          # the pipeline
#   bash scripts/setup.sh --test   # the pipeline and its test tools
# The versions installed are those in constraints.txt, the set the tests last passed on, so a fresh machine
# gets the libraries a model version records (`reproduce` compares them). PIPELINE_UNPINNED=1 installs the
# newest releases that pyproject.toml allows instead (scripts/update_constraints.sh uses it).
# Without a GPU, the CPU build of torch goes in first: a plain `torch` requirement would
# otherwise pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
pin=(-c constraints.txt)
[ "${PIPELINE_UNPINNED:-}" = "1" ] && pin=()
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  else
    # A local wheel (find-links) when the machine has one, its dependencies from the usual index
    # (torch is then already satisfied, so no CUDA build is pulled); else PyTorch's CPU index.
    if "$VENV/bin/python" -m pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
      "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "${pin[@]}"
    else
      "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
if ! "$VENV/bin/python" -m pip install --quiet -e ".${extras}" "${pin[@]}"; then
  [ ${#pin[@]} -gt 0 ] && echo "setup: the versions pinned in constraints.txt could not be installed here. If pip's error" \
    "above is a failed download or connection, run this again; if no release matches (another Python version or" \
    "platform), PIPELINE_UNPINNED=1 bash scripts/setup.sh${extras:+ --test} installs the newest that pyproject.toml allows" >&2
  exit 1
fi
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, transformers, wandb; print(f"torch {torch.__version__}, transformers {transformers.__version__}, wandb {wandb.__version__}")')"
