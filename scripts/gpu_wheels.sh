#!/usr/bin/env bash
# Before a device session on this workplace's lent GPU (docs/gpu-check.md, "On this workplace's lent GPU"):
# download into .whl/ the cp312 manylinux wheels of what the GPU image lacks for the checks that can run
# there (pydantic, zarr and their needs; faiss-cpu unless --no-faiss or it would not fit), check that
# every requirement is carried or in the image, print the sizes, and fail (exit 1) when the working tree,
# the wheels and any --carry PATH exceed the 64 MiB a device `run` call carries.
#   bash scripts/gpu_wheels.sh [--no-faiss] [--carry PATH]...   # then: run ... carry [".whl"]
#   bash scripts/gpu_wheels.sh --measure                        # only measure what would travel
#   bash scripts/gpu_wheels.sh --simulate                       # CPU check of the image's import chain
# Needs a reachable package index (pip) and git; runs with .venv's Python when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_wheels.py "$@"
