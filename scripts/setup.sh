#!/usr/bin/env bash
# Create .venv and install the pipeline into it.
#   bash scripts/setup.sh          # the pipeline
#   bash scripts/setup.sh --test   # the pipeline and its test tools
# Without a GPU, the CPU build of torch goes in first: a plain `torch` requirement would
# otherwise pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
  else
    # A local wheel (find-links) when the machine has one, its dependencies from the usual index
    # (torch is then already satisfied, so no CUDA build is pulled); else PyTorch's CPU index.
    if .venv/bin/python -m pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
      .venv/bin/python -m pip install --quiet "torch==2.13.0"
    else
      .venv/bin/python -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
.venv/bin/python -m pip install --quiet -e ".${extras}"
echo "installed into .venv: $(.venv/bin/python -c 'import torch, transformers, wandb; print(f"torch {torch.__version__}, transformers {transformers.__version__}, wandb {wandb.__version__}")')"
