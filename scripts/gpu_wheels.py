#!/usr/bin/env python3
"""The wheels that `make gpu-check`'s image mode carries to a GPU machine that reaches no package index.

    python scripts/gpu_wheels.py [--dest .whl] [--no-faiss]   # download, check, measure (gpu_wheels.sh)
    python scripts/gpu_wheels.py --measure [--dest .whl]      # only measure what a run call would carry
    python scripts/gpu_wheels.py --simulate                   # CPU check of the image's import chain

The lent GPU machines (docs/gpu-check.md, "On this workplace's lent GPU") have their own Python 3.12 with
a CUDA 13 torch, numpy, scipy, scikit-learn, pyyaml, click, tqdm, pytest, ... (IMAGE_PACKAGES, as the
workplace lists them) and reach no index: Python packages travel only as wheels inside a device `run`
call, which carries at most 64 MiB in all, the working tree included. This downloads the cp312 manylinux
wheels of exactly what the image lacks for the checks that can run there (the import chain of
trainer.step, trainer.loop, xdctools.recipe and xdctools.cluster, the step / DDP / speed / k-means stages),
checks that every requirement of every carried wheel is carried or in the image, and fails when the
working tree, the wheels and any other carried path exceed the limit. The optional faiss-cpu (for the
CPU k-means stage and `import xdctools.cluster`) is dropped, with a message, when it alone would exceed
it. Not carried, on purpose: nvidia-dali (788 MB installed: never fits), faiss-gpu (the CUDA 12 builds
cannot load on a CUDA 13 image, the CUDA 13 builds are over 100 MB), and what only the shard building
needs (PyAV, librosa, webdataset, ffmpeg-python): its sole consumers are the DALI stages.

--simulate (on a development machine, CPU only): downloads the same pins for *this* Python into a
temporary folder, installs them as the image mode does (--no-index --no-deps --target), and, in a venv
of no packages of its own with only that folder, the repository and this environment's copies of the
distributions IMAGE_PACKAGES names on PYTHONPATH, imports the chain (a module imported at load time
from anything else fails here as it would there), collects the image-mode tests, and runs the stages
the image mode must skip through the stage runner, which must skip each with its reason.

Standard library (plus pip, which vendors `packaging`) only.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 1024 * 1024  # what one device `run` call carries: working tree + carried paths
PLATFORMS = [f"manylinux{tag}_x86_64" for tag in ("_2_28", "_2_27", "_2_17", "2014", "1")]
# The versions the CPU environment (.venv) runs the test suite with: one version of each, pinned, so
# that --no-deps cannot silently pick a release with other requirements (the closure check catches that).
REQUIRED = {
    "pydantic": "2.14.4",  # xdctools.recipe
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    # in the image, but pydantic 2.14 needs >= 4.16.0 and the image's version is not known: carried so
    # that it shadows the image's (PYTHONPATH comes before site-packages; torch accepts newer ones)
    "typing-extensions": "4.16.0",
    "zarr": "3.1.6",  # xdctools.features.store, imported by trainer.loop
    "numcodecs": "0.16.6",
    "donfig": "0.8.1.post1",
    "google-crc32c": "1.9.0",
}
OPTIONAL = {"faiss-cpu": "1.15.1"}  # xdctools.cluster (k-means on the CPU): 18 MB, dropped first
CARRIED_ON_PURPOSE = {"typing-extensions"}
# What the image 'cuda' of nvidia-h100-x1 / nvidia-h200 holds (/work/.library/device/KINDS.md, as read on
# a machine running it on 2026-11-17). Versions are not listed there except torch 2.11.0 (+cu130),
# numpy 2.5.2, triton 3.6.0 and Python 3.12.3.
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
"""
IMAGE_PACKAGES = frozenset(_IMAGE_LIST.split())
# What the image mode imports: every module the runnable stages load at import time.
IMPORT_CHAIN = [
    *("trainer.step", "trainer.loop", "trainer.distributed", "trainer.optim", "trainer.data"),
    *("xdctools.recipe", "xdctools.cluster", "xdctools.cluster.report", "xdctools.features.store"),
    "benchmarks.models",
]
SIMULATED_TESTS = ["tests/gpu/test_gpu_step.py", "tests/gpu/test_gpu_ddp.py"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
    return Requirement, default_environment


# --- download ------------------------------------------------------------------------------------


def download(pins: dict[str, str], dest: Path, python_version: str, python: str = sys.executable) -> None:
    """pip download the pinned wheels (no dependencies, binary only) for CPython `python_version` on
    manylinux x86-64 into dest."""
    argv = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", "-q", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    argv += [f"{name}=={version}" for name, version in pins.items()]
    subprocess.run(argv, check=True)


def wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


def wheel_requirements(path: Path) -> tuple[str, list[str]]:
    """(version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg["Version"], msg.get_all("Requires-Dist") or []


def closure_problems(wheels: Sequence[Path], python_version: str) -> list[str]:
    """Every requirement of every wheel (extras left out, markers evaluated for CPython `python_version`
    on Linux x86-64) that is neither carried (at a matching version) nor a package of the image; two
    versions of one package; a carried package the image already has (unless on purpose)."""
    requirement_cls, default_environment = _packaging()
    env = {
        **default_environment(),
        **{"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""},
        **{"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
        **{"implementation_name": "cpython", "platform_python_implementation": "CPython"},
    }
    carried: dict[str, str] = {}
    problems = []
    for path in wheels:
        name = wheel_name(path)
        if name in carried:
            problems.append(f"two wheels of {name}: pip stops the whole install")
        carried[name] = wheel_requirements(path)[0]
        if name in IMAGE_PACKAGES and name not in CARRIED_ON_PURPOSE:
            problems.append(f"{name} is in the image already: carrying it shadows the image's version")
    for path in wheels:
        for line in wheel_requirements(path)[1]:
            req = requirement_cls(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # extras, other Pythons or platforms
            name = normalise(req.name)
            if name in carried:
                if req.specifier and not req.specifier.contains(carried[name], prereleases=True):
                    problems.append(f"{path.name} needs {line}, the carried {name} is {carried[name]}")
            elif name not in IMAGE_PACKAGES:
                problems.append(f"{path.name} needs {line}: neither carried nor in the image")
    return problems


# --- what a run call carries ---------------------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if path.is_dir():
        return sum(_size(p) for p in path.rglob("*") if p.is_symlink() or p.is_file())
    return 0


def tree_bytes(root: Path = ROOT) -> tuple[int, int]:
    """(bytes, files) of what travels without `carry`: tracked and untracked-not-ignored files (as they
    are on disk now), plus a shared/ folder inside the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    paths = {p for p in listed if p and not p.startswith("shared/")}
    total = sum(_size(root / p) for p in paths)
    if (root / "shared").is_dir():
        total += _size(root / "shared")
    return total, len(paths)


def measure(dest: Path, carry: Sequence[Path], root: Path = ROOT) -> dict[str, int]:
    tree, _ = tree_bytes(root)
    wheels = sum(p.stat().st_size for p in dest.glob("*.whl"))
    extra = sum(_size(p) for p in carry)
    return {"tree": tree, "wheels": wheels, "other": extra, "total": tree + wheels + extra}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- the CPU simulation of the image -----------------------------------------------------------


def image_like_path(target: Path) -> list[str]:
    """Symlinks in `target` to the top-level files of this environment's distributions that the image has
    (by IMAGE_PACKAGES), their .dist-info included: a stand-in for the image's site-packages."""
    from importlib import metadata

    target.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in metadata.distributions():
        name = normalise(dist.metadata["Name"] or "")
        if name not in IMAGE_PACKAGES or not dist.files:
            continue
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] not in ("..", "__pycache__")}:
            source, link = base / top, target / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
        linked.append(name)
    return sorted(linked)


# The stages image mode skips: the simulation runs them through the stage runner, which must skip each
# with its reason (DALI, faiss-gpu, the shard tools missing) without starting any.
SKIPPED_THERE = "shards,test-decode,test-align,test-faiss,test-recipe,bench-loader,bench-seek,bench-kmeans"


def simulate(pins: dict[str, str], keep: Path | None = None) -> int:
    """Download the pins for this Python, install them as the image mode does, and with only them, the
    repository and this environment's copies of the image's distributions (a venv of no packages of
    its own, PYTHONPATH as the image mode sets it): import the chain, collect the image-mode tests, and
    run the stages the image mode skips through the stage runner (a stand-in nvidia-smi)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    work = keep or Path(tempfile.mkdtemp(prefix="xdc-image-sim-"))
    wheels, site, image, bare = work / "wheels", work / "site", work / "image", work / "venv"
    download(pins, wheels, version)
    found = sorted(wheels.glob("*.whl"))
    problems = closure_problems(found, version)
    for p in problems:
        print(f"  {p}")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run(
        [*install, "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], check=True
    )
    linked = image_like_path(image)
    print(f"image stand-in: {len(linked)} distributions of this environment that the image has")
    if not (bare / "bin" / "python").exists():  # its children (stages, torchrun) see the same packages
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / "bin" / "python")
    fake = work / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), str(image)])}
    env.pop("PYTHONHOME", None)
    probe = (
        "import importlib, sys\n"
        f"for m in {IMPORT_CHAIN!r}: importlib.import_module(m)\n"
        "files = {n: getattr(m, '__file__', None) or '' for n, m in list(sys.modules.items())}\n"
        "bad = sorted({n.split('.')[0] for n, f in files.items() if f.startswith('/')"  # torch.ops: '_ops.py'
        f" and not f.startswith(({str(site)!r}, {str(ROOT)!r}, {str(image)!r}, sys.base_prefix))}})\n"
        "print('imported from elsewhere:', bad or 'nothing'); sys.exit(bool(bad))\n"
    )
    runner = [python, "scripts/gpu_check.py", "--image", "--out", str(work / "out"), "--work", str(work)]
    steps = [
        ("import chain", [python, "-c", probe], {}),
        ("collect image-mode tests",
         [python, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *SIMULATED_TESTS], {}),
        ("stages the image skips", [*runner, "--only", SKIPPED_THERE],
         {"PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"}),
    ]  # fmt: skip
    failed = bool(problems)
    for what, argv, extra in steps:
        proc = subprocess.run(argv, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True)
        print(f"--- {what}: exit {proc.returncode}\n{(proc.stdout + proc.stderr).strip()[-4000:]}")
        failed |= proc.returncode != 0
        if what.startswith("stages"):
            started = [line for line in proc.stdout.splitlines() if "(limit " in line]
            failed |= bool(started)  # every one of them must be skipped before it starts
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print("simulation:", "FAILED" if failed else "passed")
    return 1 if failed else 0


# --- command line ------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl)")
    p.add_argument("--python-version", default="3.12", help="the image's Python (default 3.12)")
    p.add_argument("--no-faiss", action="store_true", help="leave faiss-cpu out (its stage is then skipped)")
    p.add_argument("--carry", type=Path, action="append", default=[], help="another carried path to count")
    p.add_argument("--measure", action="store_true", help="only measure what a run call would carry")
    p.add_argument("--simulate", action="store_true", help="CPU check of the image's import chain")
    p.add_argument("--keep", type=Path, help="with --simulate: work in this folder and keep it")
    args = p.parse_args(None if argv is None else list(argv))
    pins = {**REQUIRED, **({} if args.no_faiss else OPTIONAL)}
    if args.simulate:
        return simulate(pins, args.keep)

    dest = args.dest
    if not args.measure:
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.whl"):  # one version of each: the folder is this script's
            old.unlink()
        try:
            download(pins, dest, args.python_version)
        except subprocess.CalledProcessError as e:
            print(
                f"Error: pip download failed (exit {e.returncode}): is a package index reachable?",
                file=sys.stderr,
            )
            return 1
    wheels = sorted(dest.glob("*.whl"))
    names = {wheel_name(w) for w in wheels}
    wanted = {normalise(n) for n in pins}
    if not args.measure and names != wanted:
        print(f"Error: expected wheels of {sorted(wanted)}, {dest} has {sorted(names)}", file=sys.stderr)
        return 1
    problems = closure_problems(wheels, args.python_version)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    sizes = measure(dest, args.carry)
    optional = [w for w in wheels if wheel_name(w) in {normalise(n) for n in OPTIONAL}]
    if sizes["total"] > LIMIT_BYTES and optional and not args.measure:
        dropped = sum(w.stat().st_size for w in optional)
        if sizes["total"] - dropped <= LIMIT_BYTES:
            for w in optional:
                print(
                    f"dropping {w.name} ({mib(w.stat().st_size)}): with it a run call would carry "
                    f"{mib(sizes['total'])} > {mib(LIMIT_BYTES)}; its stage (bench-kmeans-cpu) is skipped"
                )
                w.unlink()
            sizes = measure(dest, args.carry)
    print(f"wheels {mib(sizes['wheels'])} + working tree {mib(sizes['tree'])} + other carried paths "
          f"{mib(sizes['other'])} = {mib(sizes['total'])} of the {mib(LIMIT_BYTES)} a run call carries "
          f"({mib(LIMIT_BYTES - sizes['total'])} left)")  # fmt: skip
    for problem in problems:
        print(f"Error: {problem}", file=sys.stderr)
    if sizes["total"] > LIMIT_BYTES:
        print(f"Error: a run call would carry {mib(sizes['total'])}, over its {mib(LIMIT_BYTES)}: carry less",
              file=sys.stderr)  # fmt: skip
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
