"""tests/gpu: checks that need a CUDA device, run by `make gpu-check` (docs/gpu-check.md).

Every test here is marked `gpu` and skipped, with the reason, where torch sees no CUDA device: `make test`
and CI collect them and skip them in a moment; they never stand in for CPU coverage. The exception is
test_gpu_check_cpu.py: the CPU-computable parts of these checks (tolerances, reference decoding, the
stage runner and its report), which run everywhere.

Shards: the folder named by $XDC_GPU_SHARDS (made by `scripts/gpu_check.py --build-shards`, as
`make gpu-check` does before the tests); without it, built once per session in a temporary folder. Only
DALI reads them: where nvidia-dali does not import (the lent GPU's image, docs/gpu-check.md) the tests
that need them are skipped with the reason, and the step and DDP tests take synthetic inputs of the
loader's shapes instead (gpu_helpers.input_mode).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CPU_MODULES = {"test_gpu_check_cpu.py"}


def cuda_missing_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (
        f"no CUDA device visible (torch {torch.__version__}, {build}): the GPU checks run with "
        "`make gpu-check` on a GPU machine"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason: str | None = None
    checked = False
    for item in items:
        path = Path(str(item.fspath))
        if path.parent != HERE or path.name in CPU_MODULES:
            continue
        item.add_marker(pytest.mark.gpu)
        if not checked:
            reason, checked = cuda_missing_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gpu_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The manifest of the check's shard sets: {"root", "sets": {name: {...}}, "missing": {name: why}}."""
    from gpu_helpers import SHARDS_ENV, load_manifest, require

    require("dali")  # their only reader
    root = os.environ.get(SHARDS_ENV)
    if not root:
        require("shard-tools")
        root = str(tmp_path_factory.mktemp("gpu-shards"))
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--build-shards", root],
            cwd=ROOT,
            check=True,
        )
    manifest = load_manifest(root)
    manifest["root"] = root
    return manifest
