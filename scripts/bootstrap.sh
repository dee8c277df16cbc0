#!/usr/bin/env bash
# Sets up a fresh machine for xdctools: ffmpeg (Debian package), a venv, CPU torch, the package.
# Idempotent: every step is skipped when already done. Used by `make demo`, `make test` and CI.
# `bootstrap.sh demo` installs what the demo runs; `bootstrap.sh` (or `test`) adds what the tests need:
# chromium (the montage page's headless check), pytest and ruff, submitit (the Slurm executor's tests).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-test}
case "$MODE" in
  demo) EXTRAS=cpu ;;
  test) EXTRAS=cpu,test,slurm ;;
  *) echo "usage: bootstrap.sh [demo|test]" >&2; exit 2 ;;
esac
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}   # a CPU build on these machines; unpinned torch is a multi-GB CUDA build

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: ffmpeg (transcoding, probing); for the tests chromium (headless check of the montage pages).
missing=()
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || missing+=(ffmpeg)
[ "$MODE" = demo ] || command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[bootstrap] installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_VERSION"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi

stamp="$VENV/.xdctools-installed-$MODE"
if [ "$MODE" = demo ] && [ -f "$VENV/.xdctools-installed-test" ] && [ ! setup.py -nt "$VENV/.xdctools-installed-test" ]; then
  stamp="$VENV/.xdctools-installed-test"  # the test install holds the demo's
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[bootstrap] installing xdctools[$EXTRAS] (DALI, faiss-cpu, zarr, librosa, ...)"
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
