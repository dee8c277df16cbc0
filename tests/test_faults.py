"""Real faults at every stage after sharding: a full disk, met as a file-size limit (RLIMIT_FSIZE) on the
real command in a subprocess. Python gets EFBIG for a write past the limit (it ignores SIGXFSZ), exactly
what a full disk gives it (ENOSPC), so the command must end with one line naming the file and exit code 7,
keep nothing half-written under a final name, and, run again with the limit lifted, produce what an
undisturbed run produces. (The shard stage's faults are in test_shard_faults.py.)"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer import loop
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import MultiHead, r2plus1d_18, resnet18_audio
from trainer.step import Learner
from xdctools.errors import DiskFullError
from xdctools.features.store import open_store
from xdctools.recipe import parse_recipe

XDCTOOLS = Path(sys.executable).with_name("xdctools")


def run(args: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    """The real CLI, with a file-size limit of `limit` bytes when given (set in the child only)."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [str(XDCTOOLS), *args],
        preexec_fn=None if limit is None else limited,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error_line(proc: subprocess.CompletedProcess, path: Path) -> str:
    """The command failed as a full disk: exit 7, its last line the error naming `path`."""
    assert proc.returncode == DiskFullError.exit_code, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {path}") and "cannot write (File too large)" in line, line
    assert "Traceback" not in proc.stderr
    return line


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temp names (ours: `.name.tmp-*`; Zarr's atomic writes: `*.partial`) left behind."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    """Random encoders of width 0.125, saved as `xdctools train` saves its encoders.pt."""
    torch.manual_seed(0)
    enc = {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}
    learner = Learner(enc, {m: MultiHead(enc[m].feature_dim, {"other": 3}) for m in enc})
    path = tmp_path_factory.mktemp("faults") / "encoders.pt"
    config = {"width": 0.125, "video_layout": "torchvision", "bn_eps": 1e-5, "audio_maxpool": False}
    save_checkpoint(path, {"config": config, "model": learner.state_dict()})
    return path


def extract_args(encoders: Path, shards: Path, out: Path) -> list[str]:
    return [
        "extract", str(encoders), str(shards), "-o", str(out), "--crop", "64", "--clip-frames", "4",
        "--batch-size", "4", "--quiet",
    ]  # fmt: skip


def test_extract_on_a_full_disk_fails_in_one_line_and_resumes_to_the_same_store(
    encoders: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    calm, full = tmp_path / "calm.zarr", tmp_path / "full.zarr"
    assert run(extract_args(encoders, tiny_shards, calm)).returncode == 0
    sizes = files(calm)
    chunk = max(size for name, size in sizes.items() if "/c/" in name)
    metadata = max(size for name, size in sizes.items() if "/c/" not in name)
    limit = (metadata + chunk) // 2  # the metadata fits, a chunk of features does not
    assert metadata < limit < chunk

    one_error_line(run(extract_args(encoders, tiny_shards, full), limit), full)
    assert hidden(tmp_path) == []
    assert not open_store(full).complete  # the rows whose write was refused are not marked written

    assert run(extract_args(encoders, tiny_shards, full)).returncode == 0  # space freed: it resumes
    a, b = open_store(calm), open_store(full)
    assert b.complete and np.array_equal(a.read_index(), b.read_index())
    for m in ("video", "audio"):
        assert np.array_equal(a.read(m, 0, a.n), b.read(m, 0, b.n))


def test_cluster_output_on_a_full_disk_leaves_no_folder_and_reruns_to_the_same_labels(
    encoders: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    enc = {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}
    clip, shards = ClipSpec(length=4, crop=64), find_shards(tiny_shards, "train")
    store = extract_features(
        enc, shards, tmp_path / "feats.zarr", batch_size=4, clip=clip, run=Runtime()
    ).path
    args = ["cluster", str(store), "--k", "3", "--view", "audio", "--niter", "5"]
    assert run([*args, "-o", str(tmp_path / "calm")]).returncode == 0
    limit = min(files(tmp_path / "calm").values()) // 2  # not even the smallest output file fits

    one_error_line(run([*args, "-o", str(tmp_path / "full")], limit), tmp_path / "full")
    assert not (tmp_path / "full").exists() and hidden(tmp_path) == []
    assert run([*args, "-o", str(tmp_path / "full")]).returncode == 0
    for name in ("labels.npy", "centroids.npy", "distances.npy"):
        assert np.array_equal(np.load(tmp_path / "calm" / name), np.load(tmp_path / "full" / name))


def test_a_checkpoint_write_on_a_full_disk_stops_the_run_in_one_line_and_it_resumes_identically(
    tiny_shards: Path, tmp_path: Path
) -> None:
    recipe = {
        "name": "faults",
        "method": "xdc",
        "data": {
            "shards": str(tiny_shards),
            "val_fraction": 0.2,
            "clip_frames": 4,
            "crop": 64,
            "short_side": 64,
        },
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 8, "batch_size": 4, "lr": 0.05, "step_epochs": 1, "total_epochs": 1},
        "run": {"out": str(tmp_path / "calm"), "log_every": 1},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loop.run(parse_recipe(path.read_text()))  # undisturbed, in this process
    checkpoint = min(p.stat().st_size for p in (tmp_path / "calm" / "checkpoints").iterdir())
    limit = checkpoint // 2
    others = [size for name, size in files(tmp_path / "calm").items() if not name.endswith(".pt")]
    assert max(others) < limit  # features, clusters, logs and plots fit; a checkpoint does not

    out = tmp_path / "full"
    proc = run(["train", str(path), "--quiet", "--out", str(out)], limit)
    one_error_line(proc, out / "checkpoints" / "it000-ep000.pt")
    assert list((out / "checkpoints").iterdir()) == [] and hidden(out) == []
    assert run(["train", str(path), "--quiet", "--out", str(out)]).returncode == 0
    calm, resumed = (load_checkpoint(p / "encoders.pt")["model"] for p in (tmp_path / "calm", out))
    assert calm.keys() == resumed.keys() and all(torch.equal(calm[k], resumed[k]) for k in calm)
