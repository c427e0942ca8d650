#!/usr/bin/env bash
# Create .venv and install specdiff with its lab (the command line, benchmark, embedded model) and its
# test tools. Torch is pinned and installed first: on these CPU machines torch 2.13.0 comes from a local file, and an unpinned
# torch would pull a multi-GB CUDA build. (On a GPU machine, install your CUDA torch first.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[lab,test]"
