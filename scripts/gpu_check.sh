#!/usr/bin/env bash
# `make gpu-check`: the GPU checks on a CUDA machine; see docs/gpu-check.md.
#   1. No CUDA device visible: one line, exit 6 (missing dependency), at once, nothing installed.
#   2. Full mode (a machine that reaches PyPI and Debian): ffmpeg (Debian package) if missing; a venv of
#      its own ($GPU_VENV, default .venv-gpu, never .venv) with a CUDA 12 torch, then xdctools[gpu,test]:
#      nvidia-dali-cuda120, faiss-gpu-cu12, pytest, ... Idempotent: what is there is kept.
#      Image mode (GPU_CHECK_IMAGE=1, or auto: wheels in $GPU_CHECK_WHEELS (.whl) and no index reachable;
#      this workplace's lent GPU): no venv, no index, no apt. The machine's own python3 and its CUDA torch;
#      the wheels made by scripts/gpu_wheels.sh installed with --no-index --no-deps into $GPU_CHECK_SITE
#      (/tmp/site), which goes first on PYTHONPATH with the repository. Stages whose dependency is absent
#      there (DALI, faiss-gpu, the shard tools) are recorded as skipped with the reason.
#      Install output: $GPU_CHECK_OUT/install.log.
#   3. scripts/gpu_check.py with that Python: shards, tests/gpu, short benchmarks, report.md.
# Arguments are passed to scripts/gpu_check.py (e.g. --only test-decode,bench-seek, --budget 300).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0  # bash counts the seconds since this: the install time, and the deadline below
GPU_VENV=${GPU_VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
# PyPI's torch 2.10.0 wheel for Linux x86-64 is the CUDA 12.8 build (it pulls the nvidia-*-cu12 12.8
# wheels); from 2.11 on, PyPI's default wheels are CUDA 13 builds, and the +cu12x builds of newer
# releases live on download.pytorch.org only. CUDA 12 is what nvidia-dali-cuda120 and faiss-gpu-cu12
# are built for (one CUDA major, one cuBLAS, in the process) and runs on drivers >= 525 (13 needs 580).
# Override with e.g. GPU_TORCH="torch==2.8.0 --index-url https://download.pytorch.org/whl/cu126".
GPU_TORCH=${GPU_TORCH:-torch==2.10.0}
GPU_PIP_ARGS=${GPU_PIP_ARGS:-}  # e.g. "--no-index --find-links /wheels" where no index is reachable
OUT=${GPU_CHECK_OUT:-gpu-check}
IMAGE=${GPU_CHECK_IMAGE:-auto}  # 1: image mode, 0: full mode, auto: image when wheels and no index
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}

no_cuda() {
  echo "Error: no CUDA device visible: $1; make gpu-check needs an NVIDIA GPU and its driver" >&2
  exit 6
}
missing() {
  echo "Error: $1" >&2
  exit 6
}

case "${CUDA_VISIBLE_DEVICES-unset}" in
  "" | "-1") no_cuda "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU" ;;
esac
command -v nvidia-smi >/dev/null 2>&1 || no_cuda "nvidia-smi not found"
gpus=$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "${gpus:-0}" -gt 0 ] || no_cuda "nvidia-smi lists no GPU"

# what is left of GPU_CHECK_DEADLINE (seconds from this script's start), for the stage runner
deadline() { if [ -n "${GPU_CHECK_DEADLINE:-}" ]; then echo "--deadline $((GPU_CHECK_DEADLINE - SECONDS))"; fi; }
have_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }
index_reachable() {  # pip's own index settings, a few seconds at most where none is reachable
  timeout 20 "$PYTHON" -m pip index versions pip --retries 0 --timeout 5 >/dev/null 2>&1
}
case "$IMAGE" in
  1 | yes | true) IMAGE=1 ;;
  0 | no | false) IMAGE=0 ;;
  auto) if have_wheels && ! index_reachable; then IMAGE=1; else IMAGE=0; fi ;;
  *)
    echo "Error: GPU_CHECK_IMAGE='$IMAGE': 1 (image mode), 0 (full mode) or auto" >&2
    exit 2
    ;;
esac

if [ "$IMAGE" = 1 ]; then
  mkdir -p "$OUT"
  log="$OUT/install.log"
  : >"$log"
  have_wheels || missing "image mode: no wheels in $WHEELS/ (run bash scripts/gpu_wheels.sh where an index is reachable, and carry $WHEELS)"
  wheels=("$WHEELS"/*.whl)
  echo "[gpu-check] image mode: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)," \
    "${#wheels[@]} wheels from $WHEELS into $SITE, no index"
  printf '%s\n' "${wheels[@]}" >>"$log"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" >>"$log" 2>&1 \
    || missing "image mode: could not install the wheels of $WHEELS into $SITE with $PYTHON (gpu_wheels.sh makes cp312 wheels: Python 3.12; see $log)"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import sys, torch; sys.exit(torch.version.cuda is None)" >>"$log" 2>&1 \
    || missing "image mode: the torch of $PYTHON is not a CUDA build, or does not import (see $log)"
  # a device run call ends at 600 s: by default everything here ends by 510 s (GPU_CHECK_DEADLINE=
  # for none), leaving time to copy the report out
  GPU_CHECK_DEADLINE=${GPU_CHECK_DEADLINE-510}
  # shellcheck disable=SC2046
  exec "$PYTHON" scripts/gpu_check.py --out "$OUT" --image --install-seconds "$SECONDS" \
    $(deadline) "$@"
fi

mkdir -p "$OUT"
log="$OUT/install.log"
: >"$log"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "[gpu-check] installing ffmpeg (Debian package)"
  { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq ffmpeg; } \
    >>"$log" 2>&1 || missing "ffmpeg is missing and apt-get could not install it (see $log)"
fi

if [ ! -x "$GPU_VENV/bin/python" ]; then
  echo "[gpu-check] creating $GPU_VENV"
  if ! "$PYTHON" -m venv "$GPU_VENV" >>"$log" 2>&1; then  # Debian/Ubuntu keep ensurepip in python3-venv
    rm -rf "$GPU_VENV"
    { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv \
      && "$PYTHON" -m venv "$GPU_VENV"; } >>"$log" 2>&1 \
      || missing "could not create the venv $GPU_VENV with $PYTHON (python3-venv missing? see $log)"
  fi
fi
# shellcheck disable=SC2206  # GPU_PIP_ARGS and GPU_TORCH may hold several words on purpose
pip=("$GPU_VENV/bin/python" -m pip install -q --retries 2 --timeout 30 $GPU_PIP_ARGS)
cuda_torch() { "$GPU_VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; }

if ! cuda_torch; then
  echo "[gpu-check] installing $GPU_TORCH (a CUDA build) into $GPU_VENV"
  # shellcheck disable=SC2086
  "${pip[@]}" $GPU_TORCH >>"$log" 2>&1 \
    || missing "could not install $GPU_TORCH into $GPU_VENV (is a package index reachable? see $log)"
  cuda_torch || missing "$GPU_TORCH installed into $GPU_VENV is not a CUDA build (see $log)"
fi

stamp="$GPU_VENV/.xdctools-gpu-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[gpu-check] installing xdctools[gpu,test] (nvidia-dali-cuda120, faiss-gpu-cu12, ...) into $GPU_VENV"
  "${pip[@]}" -e ".[gpu,test]" >>"$log" 2>&1 \
    || missing "could not install xdctools[gpu,test] into $GPU_VENV (see $log)"
  cuda_torch || missing "installing xdctools[gpu,test] replaced the CUDA torch of $GPU_VENV (see $log)"
  touch "$stamp"
fi

# shellcheck disable=SC2046  # deadline() prints two words or none
exec "$GPU_VENV/bin/python" scripts/gpu_check.py --out "$OUT" --install-seconds "$SECONDS" \
  $(deadline) "$@"
