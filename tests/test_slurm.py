"""`--executor slurm` through submitit's local executor: real subprocess jobs on this machine, no Slurm.

Preemption is Slurm's path: USR2 to every task, as Slurm sends before a preemption or the time limit;
submitit calls the task's checkpoint and requeues it (the local executor restarts it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from trainer.checkpoint import load_checkpoint
from xdctools import slurm
from xdctools.commands.extract import extract
from xdctools.commands.shard import shard
from xdctools.commands.train import train
from xdctools.errors import ConfigError, DependencyError
from xdctools.features.store import open_store
from xdctools.slurm import Resources, TaskResult, failure, parse_time, rank_env

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
LOCAL = ["--executor", "slurm", "--slurm-cluster", "local"]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def task_processes(pid: int) -> list[int]:
    """The submitit tasks under process `pid` (its controllers' children), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for tid in os.listdir(f"/proc/{parent}/task"):
            try:
                todo += [int(k) for k in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
        try:
            if b"submitit.core._submit" in Path(f"/proc/{parent}/cmdline").read_bytes():
                found.append(parent)
        except OSError:
            continue
    return found


def preempt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240.0) -> float:
    """USR2 to every task of `proc` once `ready()`, as Slurm signals a job it preempts; the time it was."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be preempted:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"not ready to preempt within {timeout} s")
        time.sleep(0.01)
    now = time.time()
    pids = task_processes(proc.pid)
    assert pids, "no submitit task found"
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    return now


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --- resources, errors -------------------------------------------------------------------------


def test_slurm_times_resources_and_rank_variables() -> None:
    assert [parse_time(t) for t in ("90", "90:30", "4:00:00", "1-0", "2-12:30", "0-0:0:1")] == [
        90,
        91,
        240,
        1440,
        3630,
        1,
    ]
    for bad, why in (("25h", "not a Slurm time"), ("0", "longer than 0"), ("1:2:3:4", "not a Slurm")):
        with pytest.raises(ConfigError, match=f"--slurm-time: .*{why}"):
            parse_time(bad)
    ok = Resources(folder=Path("f"), time_min=60, cpus_per_task=4, nodes=2, ranks_per_node=8, mem="64G")
    assert slurm.check_resources(ok).ranks == 16
    bad = {"cpus_per_task": 0, "mem": "64GB", "cluster": "pbs", "array": 0}
    for field, value in bad.items():
        with pytest.raises(ConfigError) as raised:
            slurm.check_resources(Resources(**{**ok.__dict__, field: value}))
        assert len(str(raised.value).splitlines()) == 1 and str(value) in str(raised.value)

    class Job:  # what submitit's JobEnvironment says on rank 5 of 2 nodes x 4
        global_rank, local_rank, num_tasks, num_nodes, node = 5, 1, 8, 2, 1
        hostnames, job_id = ["gpu017", "gpu018"], "4242"

    assert rank_env(Job()) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu017",
        "MASTER_PORT": str(slurm.master_port("4242")),
    }
    assert 20000 <= slurm.master_port("4242") < 60000


def test_the_sbatch_script_asks_for_the_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What submitit would submit to Slurm (rendered without Slurm: a stand-in `srun` on PATH)."""
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    ranks = Resources(tmp_path, 1440, 10, nodes=2, ranks_per_node=8, gpus_per_node=8, mem="256G", qos="high")
    array = Resources(tmp_path, 240, 16, array=32, partition="cpu", account="lab", name="xdctools-shard")
    scripts = []
    for res, count in ((ranks, None), (array, 32)):
        executor = slurm.make_executor(slurm.check_resources(res))._executor  # submitit's SlurmExecutor
        if count:
            executor.parameters["map_count"] = count  # as map_array sets it
        scripts.append(executor._make_submission_file_text(executor._submitit_command_str, "uid"))
    flags = [{line for line in script.splitlines() if line.startswith("#SBATCH")} for script in scripts]
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"} <= flags[0]
    assert {"#SBATCH --cpus-per-task=10", "#SBATCH --mem=256G", "#SBATCH --qos=high"} <= flags[0]
    assert {"#SBATCH --time=1440", "#SBATCH --signal=USR2@120"} <= flags[0]
    assert {"#SBATCH --array=0-31%32", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=16"} <= flags[
        1
    ]
    assert {"#SBATCH --partition=cpu", "#SBATCH --account=lab", "#SBATCH --job-name=xdctools-shard"} <= flags[
        1
    ]
    assert not any("gpu" in flag for flag in flags[1])

    # sbatch refusing the job (here a stand-in): one line naming why, exit 4, before any wait
    (tmp_path / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\nexit 1\n"
    )
    (tmp_path / "sbatch").chmod(0o755)
    videos = ROOT.parent / "shared" / "data" / "media" / "hmdb51"
    args = [str(videos), "-o", str(tmp_path / "out"), "--executor", "slurm", "--slurm-partition", "gpux"]
    result = CliRunner().invoke(shard, args)
    assert result.exit_code == ConfigError.exit_code
    assert result.output.splitlines()[-1] == (
        "Error: --executor slurm: sbatch refused the job (sbatch: error: invalid partition specified: gpux)"
    )


def test_failure_reports_the_first_task_that_failed_for_its_own_reason() -> None:
    results = [
        TaskResult(0, error="crashed (RuntimeError: Connection closed by peer)", exit_code=1, crashed=True),
        TaskResult(1, error="loss is nan at step 3", exit_code=8),
        TaskResult(2, value=1),
    ]
    error = failure(results, what="rank")
    assert error is not None and error.exit_code == 8
    assert error.format_message() == "2 of 3 ranks failed; rank 1: loss is nan at step 3"
    assert failure(results[2:]) is None


def test_command_line_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    videos = ROOT.parent / "shared" / "data" / "media" / "hmdb51"
    out = str(tmp_path / "out")
    cases = [
        (["--slurm-time", "25h"], ConfigError.exit_code, "--slurm-time: '25h' is not a Slurm time"),
        (["--slurm-mem", "lots"], ConfigError.exit_code, "--slurm-mem: 'lots' is not a Slurm memory size"),
        (["--slurm-cpus-per-task", "0"], ConfigError.exit_code, "--slurm-cpus-per-task: must be at least 1"),
        (["--slurm-tasks", "0"], ConfigError.exit_code, "--slurm-tasks: must be at least 1 (got 0)"),
        (["--node-rank", "1"], 2, "--node-rank/--num-nodes: set by the array"),
    ]
    for extra, code, message in cases:
        result = CliRunner().invoke(shard, [str(videos), "-o", out, *LOCAL, *extra])
        assert result.exit_code == code and message in result.output, result.output
        if code == ConfigError.exit_code:
            assert result.output == f"Error: {message}" + result.output.split(message)[1]
            assert result.output.count("\n") == 1
    result = CliRunner().invoke(shard, [str(videos), "-o", out, "--slurm-time", "1:00:00"])
    assert result.exit_code == 2 and "--slurm-time: only with --executor slurm" in result.output
    result = CliRunner().invoke(train, ["recipe.yaml", "--nodes", "2"])
    assert result.exit_code == 2 and "--nodes: only with --executor slurm" in result.output
    assert not (tmp_path / "out").exists()

    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    result = CliRunner().invoke(shard, [str(videos), "-o", out, "--executor", "slurm"])
    assert result.exit_code == DependencyError.exit_code
    assert result.output == (
        "Error: --executor slurm: needs submitit; install it with pip install 'xdctools[slurm]'\n"
    )


# --- shard: an array over the units ------------------------------------------------------------

SHARD_ARGS = ["--short-side", "64", "--audio", "optional", "--shard-size", "2", "--shard-bytes", "150000"]
SHARD_ARGS += ["--max-failed", "0.5"]


@pytest.fixture(scope="module")
def tree(class_tree: Path) -> Path:
    """The class tree of real clips shared with other shard tests (conftest: 4 units of 2 videos)."""
    return class_tree


@pytest.fixture(scope="module")
def one_process(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one") / "shards"
    result = CliRunner().invoke(shard, [str(tree), "-o", str(out), *SHARD_ARGS, "--workers", "1"])
    assert result.exit_code == 0, result.output
    return output_files(out)


def test_an_array_of_two_tasks_writes_the_files_of_one_process(
    tree: Path, tmp_path: Path, one_process: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "shards"
    args = [
        str(tree),
        "-o",
        str(out),
        *SHARD_ARGS,
        *LOCAL,
        "--slurm-tasks",
        "2",
        "--slurm-cpus-per-task",
        "1",
    ]
    result = CliRunner().invoke(shard, args)
    assert result.exit_code == 0, result.output
    assert output_files(out) == one_process  # tars, .idx, markers, dataset.json, errors.jsonl
    lines = result.output.splitlines()
    assert lines[0].startswith("submitted job ") and lines[0].endswith(f"2 array tasks; logs in {out}.slurm")
    assert sorted(line for line in lines if line.endswith(" ended")) == ["task 0 ended", "task 1 ended"]
    summary = [line for line in lines if line.startswith("task ") and not line.endswith(" ended")]
    assert summary == [
        "task 0: 3 ok, 1 failed of 4 videos; units: 2 written, 0 already complete",
        "task 1: 3 ok, 1 failed of 4 videos; units: 2 written, 0 already complete",
    ]
    assert "ok: 6 videos" in result.output and f"dataset: {out / 'dataset.json'}" in result.output
    assert len(list((tmp_path / "shards.slurm").glob("*_log.out"))) == 2  # one log per task

    # A task that fails ends the command with the exit code one process would give (no ffmpeg: 6).
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    result = CliRunner().invoke(shard, [*args[:2], str(tmp_path / "other"), *args[3:]])
    assert result.exit_code == DependencyError.exit_code, result.output
    assert result.output.splitlines()[-1] == (
        "Error: 2 of 2 tasks failed; task 0: ffmpeg and ffprobe: not found on PATH; install ffmpeg "
        "(Debian: apt-get install ffmpeg)"
    )


def test_a_preempted_array_task_is_requeued_and_ends_with_the_same_files(
    tree: Path, tmp_path: Path, one_process: dict[str, bytes]
) -> None:
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "xdctools", "shard", str(tree), "-o", str(out), *SHARD_ARGS, *LOCAL]
    args += ["--slurm-tasks", "2", "--slurm-cpus-per-task", "1"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def mid_unit() -> bool:  # a unit complete and a later one half-written
        markers = {p.name.split(".")[0] for p in out.glob("train/*.stats.json")}
        return bool(markers and {p.name[:12] for p in out.glob("train/*.tar.tmp")} - markers)

    preempt_when(proc, mid_unit)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    assert output_files(out) == one_process
    assert "units: 1 written, 1 already complete" in output  # the requeued task kept its complete unit
    logs = "".join(p.read_text() for p in (tmp_path / "shards.slurm").glob("*_log.out"))
    assert logs.count("this job is preempted") >= 2 and "Requeued job" in logs


# --- extract: one job of ranks -----------------------------------------------------------------


@pytest.mark.slow
def test_extract_on_two_ranks_writes_the_store_of_one_process(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.models import r2plus1d_18

    torch.manual_seed(0)
    torch.save({"state_dict": r2plus1d_18(width=0.125).state_dict()}, tmp_path / "w.pth")
    args = [str(tmp_path / "w.pth"), str(tiny_shards), "--crop", "64", "--clip-frames", "4", "--quiet"]
    one = CliRunner().invoke(extract, [*args, "-o", str(tmp_path / "one.zarr")])
    assert one.exit_code == 0, one.output
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    two = CliRunner().invoke(
        extract, [*args, "-o", str(tmp_path / "two.zarr"), *LOCAL, "--gpus-per-node", "2"]
    )
    assert two.exit_code == 0, two.output
    assert two.output.splitlines()[-1] == one.output.splitlines()[-1].replace("one.zarr", "two.zarr")
    a, b = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "two.zarr")
    assert b.complete and np.array_equal(a.read_index(), b.read_index())
    np.testing.assert_allclose(b.read("video", 0, 9), a.read("video", 0, 9), rtol=0, atol=1e-6)  # measured: 0


# --- train: one job of ranks, preempted and requeued -------------------------------------------


@pytest.mark.slow
def test_train_on_two_ranks_preempted_resumes_and_ends_as_torchrun(tiny_shards: Path, tmp_path: Path) -> None:
    """2 gloo ranks under the local executor, started with --no-resume and preempted after the first
    epoch's checkpoint: the requeued job resumes from it (the records before the preemption are kept)
    and ends bit-identical to today's `torchrun --nproc_per_node=2` run, which runs alongside."""
    recipe = {
        "name": "tiny",
        "method": "xdc",
        "data": {"shards": str(tiny_shards), "val_fraction": 0.2, "clip_frames": 4, "crop": 64},
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 1, "niter": 10},
        "optim": {"epoch_size": 8, "batch_size": 2, "lr": 0.05, "warmup_epochs": 0, "step_epochs": 1},
        "run": {"log_every": 1},
    }
    recipe["data"] |= {"short_side": 64, "num_threads": 1}
    recipe["optim"] |= {"total_epochs": 2}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = [sys.executable, "-m", "xdctools", "train", str(path), "--quiet", "--out"]
    torchrun = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *run[1:], str(tmp_path / "a")]
    pipes = {"env": env(), "cwd": ROOT, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    reference = subprocess.Popen(torchrun, **pipes)
    proc = subprocess.Popen(
        [*run, str(tmp_path / "b"), "--no-resume", *LOCAL, "--gpus-per-node", "2"], **pipes
    )
    preempted = preempt_when(proc, (tmp_path / "b" / "checkpoints" / "it000-ep001.pt").exists)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Run done" in output and "submitted job " in output
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "b" / "slurm").glob("*_log.out"))
    assert "this job is preempted" in logs and "Requeued job" in logs

    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "it000-ep002.pt") for r in "ab")
    assert (a["step"], a["world_size"]) == (b["step"], b["world_size"]) == (4, 2)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    records = {
        r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"
    }
    volatile = ("time", "clips_per_s", "seconds")
    assert [{k: v for k, v in x.items() if k not in volatile} for x in records["a"]] == [
        {k: v for k, v in x.items() if k not in volatile} for x in records["b"]
    ]
    kept = [x["event"] for x in records["b"] if x["time"] < preempted]  # written before the preemption
    assert kept[-1] == "epoch" and "step" in kept  # resumed after epoch 1, not started over
