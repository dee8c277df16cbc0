"""Real faults at every stage after sharding: a full disk, met as a file-size limit (RLIMIT_FSIZE) on the
real command in a subprocess. Python gets EFBIG for a write past the limit (it ignores SIGXFSZ), exactly
what a full disk gives it (ENOSPC), so the command must end with one line naming the file and exit code 7,
keep nothing half-written under a final name, and, run again with the limit lifted, produce what an
undisturbed run produces. (The shard stage's faults are in test_shard_faults.py.)"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
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
from xdctools.errors import DiskFullError, DivergedError
from xdctools.features.store import create_store, open_store
from xdctools.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
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


def train_recipe(shards: Path, out: Path, path: Path, lr: float = 0.05) -> Path:
    """A small XDC recipe on the tiny shards, written to `path`."""
    recipe = {
        "name": "faults",
        "method": "xdc",
        "data": {"shards": str(shards), "val_fraction": 0.2, "clip_frames": 4, "crop": 64, "short_side": 64},
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 8, "batch_size": 4, "lr": lr, "step_epochs": 1, "total_epochs": 1},
        "run": {"out": str(out), "log_every": 1},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_checkpoint_write_on_a_full_disk_stops_the_run_in_one_line_and_it_resumes_identically(
    tiny_shards: Path, tmp_path: Path
) -> None:
    path = train_recipe(tiny_shards, tmp_path / "calm", tmp_path / "r.yaml")
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


# --- a loss that goes non-finite ----------------------------------------------------------------------------


def test_a_loss_gone_non_finite_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    path = train_recipe(tiny_shards, out, tmp_path / "r.yaml", lr=1e36)  # the first step throws it to inf
    proc = run(["train", str(path), "--quiet"])
    assert proc.returncode == DivergedError.exit_code, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "diverged"]
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, record["step"])) and record["step"] >= 2  # logged up to the bad step
    good = out / "checkpoints" / "it000-ep000.pt"  # after the labels, before any step
    assert line == (
        f"Error: {out}: the training loss is not finite (NaN or inf) at step {record['step']} (iteration 0, "
        f"epoch 1); the run stopped and the last good checkpoint, kept, is {good}. Lower optim.lr, or use "
        "model.precision: fp32"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [good.name]
    weights = load_checkpoint(good)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (out / "encoders.pt").exists()


def test_finetuning_whose_loss_goes_non_finite_stops_in_one_line(synth_shards: Path, tmp_path: Path) -> None:
    path = finetune_recipe(synth_shards, tmp_path / "ft", tmp_path / "ft.yaml", lr=1e36)
    proc = run(["finetune", str(path), "--checkpoint", "none", "--quiet"])
    assert proc.returncode == DivergedError.exit_code, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    (folder,) = (tmp_path / "ft").rglob("split1")
    assert line == (
        f"Error: {folder}: the training loss is not finite (NaN or inf) in epoch 1 at lr 1e+36; the run "
        "stopped and no checkpoint was written yet. Lower the lr"
    )
    assert not any(folder.rglob("*.pt")) and not (folder / "result.json").exists()


# --- SIGKILL at the stages the training-loop tests do not cover --------------------------------------------


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300.0) -> None:
    """SIGKILL `proc` as soon as `ready()` is true (fail if it ends first or never gets there)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"it ended before {what}:\n{proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not reached in {timeout} s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


EXTRACT = """
import sys, torch
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import r2plus1d_18, resnet18_audio
torch.manual_seed(0)
enc = {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}
shards = find_shards(sys.argv[1], "train")
extract_features(enc, shards, sys.argv[2], batch_size=2, clip=ClipSpec(length=4, crop=64), run=Runtime(),
                 chunk_rows=2)
"""


def written_chunks(path: Path) -> int:
    try:
        store = open_store(path)
    except Exception:  # not created yet, or its metadata being written: not ready
        return 0
    return store.num_chunks - len(store.missing_chunks())


def test_extraction_killed_midway_resumes_to_the_same_store(tiny_shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def extract(out: Path) -> subprocess.Popen:
        args = [sys.executable, "-c", EXTRACT, str(tiny_shards), str(out)]
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    calm = extract(tmp_path / "calm.zarr")
    killed = tmp_path / "killed.zarr"
    kill_when(extract(killed), lambda: written_chunks(killed) >= 2, "2 chunks written")
    store = open_store(killed)
    assert 2 <= written_chunks(killed) < store.num_chunks  # killed with rows left to write
    assert extract(killed).wait(timeout=300) == 0 and calm.wait(timeout=300) == 0
    a, b = open_store(tmp_path / "calm.zarr"), open_store(killed)
    assert b.complete and np.array_equal(a.read_index(), b.read_index())
    for m in ("video", "audio"):
        assert np.array_equal(a.read(m, 0, a.n), b.read(m, 0, b.n))


def test_cluster_output_killed_while_written_leaves_no_folder_and_reruns_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 2M rows: the assignment pass writes labels.npy into the temporary output folder block by block, then
    # the index and the small files follow; the kill lands in that window, long beside the 20 ms poll
    x = rng.standard_normal((2_000_000, 4)).astype(np.float32)
    store = tmp_path / "feats.zarr"
    s = create_store(store, n=len(x), dims={"video": 4, "audio": 4})
    s.write_rows(0, {"video": x, "audio": x[:, ::-1]}, np.arange(len(x)))
    args = ["cluster", str(store), "--k", "4", "--view", "video", "--niter", "2"]
    calm, out = tmp_path / "calm", tmp_path / "killed"
    assert run([*args, "-o", str(calm)]).returncode == 0
    proc = subprocess.Popen(
        [str(XDCTOOLS), *args, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    kill_when(proc, lambda: any(tmp_path.glob(".killed.tmp-*/labels.npy")), "the output being written")
    assert not out.exists()  # killed while its files were written under a temp name: no output at all
    assert run([*args, "-o", str(out)]).returncode == 0
    assert hidden(tmp_path) == []  # the killed attempt's temp folder is cleared by the rerun
    for name in ("labels.npy", "centroids.npy", "distances.npy"):
        assert np.array_equal(np.load(calm / name), np.load(out / name))


def finetune_recipe(shards: Path, out: Path, path: Path, lr: float = 0.05) -> Path:
    """Full finetuning of a Scratch encoder on the synthetic shards for 2 epochs, written to `path`."""
    recipe = {
        "name": "ft",
        "dataset": "tiny",
        "mode": "full",
        "data": {
            "shards": str(shards),
            "modality": "video",
            "split_layout": "train-test",
            "splits": [1],
            "clip_frames": 4,
            "crop": 32,
            "num_threads": 1,
        },
        "model": {"width": 0.0625, "method": "Scratch"},
        "optim": {"epoch_size": 8, "batch_size": 4, "lr": lr, "step_epochs": 1, "total_epochs": 2},
        "test": {"num_clips": 4, "batch_size": 4},
        "run": {"out": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_finetuning_killed_midway_resumes_to_the_same_result(synth_shards: Path, tmp_path: Path) -> None:
    recipe = finetune_recipe(synth_shards, tmp_path / "calm", tmp_path / "ft.yaml")
    args = ["finetune", str(recipe), "--checkpoint", "none", "--quiet"]
    assert run(args).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(XDCTOOLS), *args, "--set", f"run.out={killed}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_when(proc, lambda: any(killed.rglob("it000-ep001.pt")), "epoch 1's checkpoint")
    assert run([*args, "--set", f"run.out={killed}"]).returncode == 0
    (a,), (b,) = (list(p.rglob("split1")) for p in (tmp_path / "calm", killed))
    done = [json.loads((f / "result.json").read_text()) for f in (a, b)]
    same = [{k: v for k, v in d.items() if k != "seconds"} for d in done]
    assert same[0] == same[1]
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    last = [load_checkpoint(next(f.rglob("it000-ep002.pt"))) for f in (a, b)]
    for part in ("encoder", "head"):
        assert all(torch.equal(v, last[1][part][k]) for k, v in last[0][part].items())
