"""What `make gpu-check` computes without a GPU, run everywhere (not marked `gpu`, never skipped):

- the stage runner (scripts/gpu_check.py): time limits that kill a hung stage and its children, figures
  kept from a stage cut off, results.jsonl and report.md written after every stage, the budget, the
  deadline, stages that depend on a failed one, stages skipped with the reason where what they require
  is missing (DALI, faiss-gpu, the shard tools: image mode), SIGTERM, the report rebuilt from
  results.jsonl, pytest output parsing;
- scripts/gpu_check.sh without a CUDA device: one line, exit 6, at once, nothing installed; its image
  mode: the carried wheels installed with --no-index into a --target folder, then the torch check;
- scripts/gpu_wheels.py's checks: requirements carried or in the image, one version of each, the size
  of what a device call carries;
- the synthetic inputs of the step and DDP tests (shapes, scale, determinism) and the tests' skips;
- the shard building step (small: a few tiny videos, both codecs);
- the helpers of the GPU tests (gpu_helpers.py): the decoding reference and tolerance against DALI's
  CPU decoder on synthetic and real clips, label agreement (NMI), assignment agreement, gradient
  similarity, the flash/click check on CPU-loaded clips.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import av
import gpu_helpers as H
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SHELL = ROOT / "scripts" / "gpu_check.sh"
WHEELS = ROOT / "scripts" / "gpu_wheels.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


runner = _load("gpu_check", SCRIPT)
wheels = _load("gpu_wheels", WHEELS)


# --- the stage runner ---------------------------------------------------------------------------


def _stage(name: str, code: str, timeout: float = 30, kind: str = "bench", **kw) -> runner.Stage:
    """A stage running Python `code`; FIG is the path of its figures file."""
    prelude = "import json, os, subprocess, sys, time\nFIG = os.environ['XDC_GPU_CHECK_FIGURES']\n"
    argv = [sys.executable, "-c", prelude + textwrap.dedent(code)]
    return runner.Stage(name, kind, timeout, argv, f"what {name} does", **kw)


FIGURE = "open(FIG, 'a').write(json.dumps({'name': 'speed', 'value': 12.5, 'unit': 'clips/s'}) + '\\n')\n"


def test_stages_time_out_fail_and_leave_figures_as_they_go(tmp_path: Path) -> None:
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path / "work", budget_s=60)
    pid_file = tmp_path / "grandchild.pid"
    stages = [
        _stage("ok", FIGURE + "print('fine')"),
        # writes a figure, starts two children (one in a session of its own, as torchrun under a test
        # may be), then hangs: killed at 2 s with all of them
        _stage(
            "hang",
            FIGURE + "p = subprocess.Popen(['sleep', '300'])\n"
            "q = subprocess.Popen(['sleep', '301'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(f'{{p.pid}} {{q.pid}}')\ntime.sleep(300)",
            timeout=2,
        ),
        _stage("fail", "print('something broke'); sys.exit(3)"),
        _stage("after-fail", "print('never')", needs=("fail",)),
        _stage("setup-ok", "print('setup')", kind="setup", budgeted=False),
    ]
    snapshots: list[str] = []

    def say(line: str) -> None:  # called after each stage's record is written: the report must show it
        if line.startswith("[gpu-check]") and "limit" not in line and (ctx.out / "report.md").is_file():
            snapshots.append((ctx.out / "report.md").read_text())

    t0 = time.monotonic()
    code = runner.run_all(ctx, stages, say=say)
    assert time.monotonic() - t0 < 30
    assert code == runner.EXIT_FAILED
    records = {}
    for line in (ctx.out / "results.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["event"] == "end":
            records[entry["stage"]] = entry
    assert {k: r["status"] for k, r in records.items()} == {
        "ok": "passed", "hang": "timeout", "fail": "failed", "after-fail": "not-run", "setup-ok": "passed",
    }  # fmt: skip
    assert records["ok"]["figures"] == [{"name": "speed", "value": 12.5, "unit": "clips/s"}]
    assert records["hang"]["figures"] == records["ok"]["figures"]  # kept although the stage was killed
    assert records["hang"]["seconds"] < 15 and "killed at its 2 s limit" in records["hang"]["summary"]
    assert records["fail"]["rc"] == 3 and "something broke" in "\n".join(records["fail"]["tail"])
    assert records["after-fail"]["summary"] == "needs fail"
    time.sleep(0.2)
    for child in map(int, pid_file.read_text().split()):
        stat = Path(f"/proc/{child}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"{child} lives on"

    # the report after the first stage already had its row, the others pending
    assert (
        "| ok | what ok does | passed |" in snapshots[0]
        and "| hang | what hang does | pending |" in snapshots[0]
    )
    report = (ctx.out / "report.md").read_text()
    assert "| hang | what hang does | TIMEOUT |" in report and "| fail | what fail does | FAILED |" in report
    assert "| speed | 12.5 clips/s |" in report and "something broke" in report
    assert (ctx.logs / "hang.log").read_text().startswith("$ ")


def test_budget_stops_stages_and_the_report_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "MIN_STAGE_S", 1.0)
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path, budget_s=2.0)
    stages = [_stage("slow", "time.sleep(30)"), _stage("next", "print('x')")]
    assert runner.run_all(ctx, stages, say=lambda _: None) == runner.EXIT_FAILED
    results = runner.Results.load(ctx)
    assert results.records["slow"].status == "timeout" and results.records["slow"].limit_s == ctx.budget_s
    assert results.records["next"].status == "not-run" and results.records["next"].summary == "budget spent"

    # a run cut off inside a stage: a start line without its end
    with (ctx.out / "results.jsonl").open("a") as f:
        f.write(json.dumps({"event": "start", "stage": "cut", "limit_s": 9, "time": "t"}) + "\n")
        f.write('{"event": "end", "stage": "half-writ')  # a writer killed mid-line
    results = runner.Results.load(ctx)
    results.planned = stages
    results.write_report()
    assert results.records["cut"].status == "cut off"
    assert "| cut |  | CUT OFF |" in (ctx.out / "report.md").read_text()


def test_sigterm_kills_the_stage_and_records_it(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import gpu_check as runner
        from pathlib import Path
        ctx = runner.Context(out=Path({str(tmp_path / "out")!r}), work=Path({str(tmp_path)!r}), budget_s=100)
        hang = [sys.executable, "-c", "import time; time.sleep(300)"]
        stage = runner.Stage("hang", "test", 90, hang, "hangs")
        sys.exit(runner.run_all(ctx, [stage]))
        """)
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 20
    while not (results.is_file() and "start" in results.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    last = json.loads(results.read_text().splitlines()[-1])
    assert last["stage"] == "hang" and last["status"] == "interrupted"
    assert "INTERRUPTED" in (tmp_path / "out" / "report.md").read_text()


def test_no_cuda_in_the_gpu_venv_stops_with_code_6(tmp_path: Path) -> None:
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path)
    env = {"torch": {"version": "2.10.0+cpu", "cuda": None, "available": False}}
    write_env = f"open({str(ctx.out / 'env.json')!r}, 'w').write({json.dumps(env)!r})"
    stages = [_stage("env", write_env, kind="setup", budgeted=False), _stage("next", "print('x')")]
    lines: list[str] = []
    assert runner.run_all(ctx, stages, say=lines.append) == runner.EXIT_NO_CUDA
    assert lines[-1] == (
        "Error: torch 2.10.0+cpu (a CPU build) sees no CUDA device: torch.cuda.is_available() is False"
    )
    records = [json.loads(line) for line in (ctx.out / "results.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["event"], r.get("status")) for r in records if r["stage"] == "next"] == [
        ("next", "end", "not-run")
    ]


def test_parse_pytest_output_with_a_cut_off_test() -> None:
    log = textwrap.dedent("""\
        tests/gpu/test_gpu_decode.py::test_mixed[synth-vp9] PASSED               [ 25%]
        tests/gpu/test_gpu_decode.py::test_mixed[media-vp9] SKIPPED (shard set media-vp9 was not built)
        tests/gpu/test_gpu_decode.py::test_loader FAILED                         [ 75%]
        tests/gpu/test_gpu_decode.py::test_h264 \n\
        =========================== short test summary info ============================
        SKIPPED [1] tests/gpu/test_gpu_decode.py:40: shard set media-vp9 was not built: no real clips
        FAILED tests/gpu/test_gpu_decode.py::test_loader - AssertionError: mean 3.10 (<= 2.0)
        """)
    tests = {t["test"].split("::")[1]: t for t in runner.parse_pytest(log)}
    assert {k: t["outcome"] for k, t in tests.items()} == {
        "test_mixed[synth-vp9]": "passed", "test_mixed[media-vp9]": "skipped", "test_loader": "failed",
        "test_h264": "running",
    }  # fmt: skip
    assert tests["test_loader"]["detail"] == "AssertionError: mean 3.10 (<= 2.0)"
    assert tests["test_mixed[media-vp9]"]["detail"].startswith("shard set media-vp9 was not built")
    assert runner.status_of("test", 0, [{"test": "a", "outcome": "skipped"}]) == "skipped"
    assert runner.status_of("test", 5, []) == "failed"  # pytest collected nothing


def test_stage_list_names_every_command() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--list", "--work", "/tmp/w", "--media", "none"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = [line.split()[0] for line in out.splitlines()]
    assert names[:2] == ["env", "shards"] and names[-1] == "bench-speed"
    assert {f"test-{n}" for n in ("decode", "align", "faiss", "ddp", "recipe", "step")} <= set(names)
    assert "benchmarks/loader.py --device cuda --shards /tmp/w/shards/loader-vp9" in out
    for module in (
        "test_gpu_decode",
        "test_gpu_align",
        "test_gpu_faiss",
        "test_gpu_ddp",
        "test_gpu_recipe",
        "test_gpu_step",
    ):
        assert (ROOT / "tests" / "gpu" / f"{module}.py").is_file()


# What the lent GPU's image has (env.json as gather_env writes it there): no DALI, faiss-cpu, no shard tools.
IMAGE_ENV = {
    "torch": {"version": "2.11.0+cu130", "cuda": "13.0", "available": True, "device_count": 1},
    "dali": "error: ModuleNotFoundError: No module named 'nvidia.dali'",
    "faiss": {"version": "1.15.1", "gpus": 0, "gpu_build": False},
    "ffmpeg": "error: [Errno 2] No such file or directory: 'ffmpeg'",
    "ffprobe": False,
    "modules": {"av": False, "librosa": False, "webdataset": False, "ffmpeg": False},
}


def test_unmet_requirements_say_why() -> None:
    assert runner.unmet("dali", IMAGE_ENV, image=True) == (
        "nvidia-dali not importable (ModuleNotFoundError: No module named 'nvidia.dali'): DALI's wheel "
        f"({runner.DALI_SIZE}) cannot be carried to this machine, whose device calls carry 64 MiB in all "
        "and which reaches no package index"
    )
    full_mode = runner.unmet("dali", IMAGE_ENV, image=False)
    assert full_mode.endswith("install xdctools[gpu] (nvidia-dali-cuda120), as scripts/gpu_check.sh does")
    faiss_gpu = runner.unmet("faiss-gpu", IMAGE_ENV, image=True)
    assert faiss_gpu.startswith("faiss 1.15.1 is a CPU build (faiss-cpu): no faiss GPU build can be carried")
    assert "faiss-gpu-cu12 needs CUDA 12" in faiss_gpu
    assert runner.unmet("faiss", IMAGE_ENV, image=True) is None  # faiss-cpu carried: the CPU k-means runs
    shard_tools = runner.unmet("shard-tools", IMAGE_ENV, image=True)
    assert shard_tools == (
        "building the check's shards needs PyAV, librosa, webdataset, ffmpeg-python, the ffmpeg and ffprobe "
        "programs, missing here (not carried: only the DALI stages use the shards)"
    )
    assert runner.unmet("multi-gpu", IMAGE_ENV, image=True) == (
        "torch sees 1 GPU(s) here: the multi-GPU case runs on a machine with 2 or more"
    )
    assert runner.unmet("multi-gpu", {}, image=False).startswith("torch sees 0 GPU(s) here")
    full = {
        **IMAGE_ENV,
        "torch": {**IMAGE_ENV["torch"], "device_count": 2},
        "dali": "2.4.0",
        "faiss": {"version": "1.14.1", "gpus": 1, "gpu_build": True},
        "ffmpeg": "ffmpeg version 7.1",
        "ffprobe": True,
        "modules": dict.fromkeys(runner.SHARD_MODULES, True),
    }
    assert all(runner.unmet(r, full, image=False) is None for r in runner.REQUIREMENTS)
    gone = {**full, "faiss": {"version": "error: ModuleNotFoundError: No module named 'faiss'", "gpus": 0}}
    assert runner.unmet("faiss", gone, image=False).startswith("faiss not importable (ModuleNotFoundError")
    blind = {**full, "faiss": {"version": "1.14.1", "gpus": 0, "gpu_build": True}}
    assert runner.unmet("faiss-gpu", blind, image=False).startswith("faiss 1.14.1 sees no GPU: install")
    assert runner.unmet("dali", {}, image=False).startswith("nvidia-dali not importable (not probed)")


def test_image_mode_skips_with_the_reason_and_runs_the_rest(tmp_path: Path) -> None:
    """The image mode's plan on a machine like the lent GPU: every stage that needs DALI, faiss-gpu or the
    shard tools is skipped with its reason (not a failure: exit 0); the others run in order; the report
    says image mode."""
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path / "work", image=True, budget_s=100)
    planned = runner.plan(ctx)
    assert planned[-1].name == "bench-kmeans-cpu"  # image mode only: last, it needs no GPU
    assert "bench-kmeans-cpu" not in {s.name for s in runner.plan(runner.Context(out=ctx.out, work=ctx.work))}
    stages = []
    for s in planned:  # every stage that is started runs a stand-in that records its name
        code = f"open({str(tmp_path / 'ran')!r}, 'a').write({s.name!r} + '\\n')"
        if s.name == "env":
            code += f"; open({str(ctx.out / 'env.json')!r}, 'w').write({json.dumps(IMAGE_ENV)!r})"
        stages.append(runner.Stage(s.name, s.kind, 30, [sys.executable, "-c", code], s.what, s.needs,
                                   s.budgeted, s.requires))  # fmt: skip
    assert runner.run_all(ctx, stages, install_s=12.0, say=lambda _: None) == 0
    ran = (tmp_path / "ran").read_text().split()
    assert ran == ["env", "test-ddp", "test-step", "bench-speed", "bench-kmeans-cpu"]
    records = runner.Results.load(ctx).records
    skipped = {n: r.summary for n, r in records.items() if r.status == "skipped"}
    assert set(skipped) == {
        *("shards", "test-decode", "test-align", "test-faiss", "test-multi-gpu", "test-recipe"),
        *("bench-loader", "bench-seek", "bench-kmeans"),
    }
    assert skipped["test-decode"] == runner.unmet("dali", IMAGE_ENV, image=True)
    assert skipped["shards"] == "; ".join(
        [runner.unmet("dali", IMAGE_ENV, True), runner.unmet("shard-tools", IMAGE_ENV, True)]
    )
    assert skipped["bench-kmeans"] == runner.unmet("faiss-gpu", IMAGE_ENV, image=True)
    assert records["install"].what.startswith("image mode: carried wheels")
    report = (ctx.out / "report.md").read_text()
    assert "**Image mode**" in report and "| test-faiss | " in report
    assert "| skipped | 0 / - | faiss 1.15.1 is a CPU build (faiss-cpu): no faiss GPU build" in report


def test_requirements_read_once_and_only_when_a_stage_has_some(tmp_path: Path) -> None:
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path, image=True)
    probed = []

    def machine() -> dict:
        probed.append(1)
        return IMAGE_ENV

    stages = [
        _stage("plain", "print('x')"),
        _stage("needs-dali", "print('never')", requires=("dali",)),
        _stage("needs-faiss", "print('x')", requires=("faiss",)),
    ]
    assert runner.run_all(ctx, stages, say=lambda _: None, machine=machine) == 0
    records = runner.Results.load(ctx).records
    assert [records[n].status for n in ("plain", "needs-dali", "needs-faiss")] == [
        "passed",
        "skipped",
        "passed",
    ]
    assert probed == [1]  # once, and only when a stage requires something


def test_deadline_caps_every_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "MIN_STAGE_S", 1.0)
    monkeypatch.setattr(runner, "KILL_GRACE_S", 0.5)
    ctx = runner.Context(out=tmp_path / "out", work=tmp_path, budget_s=100, deadline_s=3.0)
    stages = [
        _stage("setup", "time.sleep(30)", kind="setup", budgeted=False),  # own limit 30 s, capped to ~2 s
        _stage("after", "print('x')"),
    ]
    t0 = time.monotonic()
    assert runner.run_all(ctx, stages, say=lambda _: None) == runner.EXIT_FAILED
    assert time.monotonic() - t0 < 10
    records = runner.Results.load(ctx).records
    assert records["setup"].status == "timeout" and records["setup"].limit_s <= 2.0
    assert records["after"].status == "not-run" and records["after"].summary == "deadline reached (3 s)"


def test_image_stage_list() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--list", "--image", "--work", "/tmp/w"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "[requires dali]" in lines["test-decode"] and "[requires faiss-gpu]" in lines["test-faiss"]
    assert "requires" not in lines["test-step"] and "requires" not in lines["test-ddp"]
    assert "benchmarks/cluster.py --device cpu --kmeans 1000000" in lines["bench-kmeans-cpu"]


# --- scripts/gpu_check.sh without a GPU -----------------------------------------------------------


def _bin(tmp_path: Path, nvidia_smi: str | None) -> Path:
    """A PATH with only what the no-CUDA path needs, and a fake nvidia-smi (or none)."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("bash", "dirname", "timeout", "grep", "make"):
        (path / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        (path / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (path / "nvidia-smi").chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("nvidia_smi", "visible", "why"),
    [
        (None, None, "nvidia-smi not found"),
        ("exit 0", None, "nvidia-smi lists no GPU"),
        ("echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9", None,
         "nvidia-smi lists no GPU"),
        ("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'", "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ],
)  # fmt: skip
def test_no_cuda_device_stops_at_once_with_code_6(tmp_path: Path, nvidia_smi, visible, why) -> None:
    env = {"PATH": str(_bin(tmp_path, nvidia_smi)), "GPU_VENV": str(tmp_path / "venv"),
           "GPU_CHECK_OUT": str(tmp_path / "out")}  # fmt: skip
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SHELL)], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 6
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"Error: no CUDA device visible: {why}; make gpu-check needs an NVIDIA GPU and its driver"
    ]
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()
    if nvidia_smi is None:  # through make: the same line; make itself exits 2 for any failed recipe
        proc = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[0].startswith("Error: no CUDA device visible: nvidia-smi not found")
        assert "Error 6" in proc.stderr


def _wheel(folder: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel of one module `name`, that pip installs."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]
        )
        + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
        z.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in [*files, f"{info}/RECORD"]))
    return path


def _image_mode(tmp_path: Path, wheel_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    if not fake.is_dir():
        _bin(tmp_path, "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'")
    env = {
        **os.environ,
        **{"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable},
        **{"GPU_CHECK_IMAGE": "1", "GPU_CHECK_WHEELS": str(wheel_dir), "GPU_VENV": str(tmp_path / "venv")},
        **{"GPU_CHECK_SITE": str(tmp_path / "site"), "GPU_CHECK_OUT": str(tmp_path / "out")},
        **extra,
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", str(SHELL)], env=env, capture_output=True, text=True, timeout=120)


def test_image_mode_installs_the_carried_wheels_without_an_index(tmp_path: Path) -> None:
    """GPU_CHECK_IMAGE=1 (a fake nvidia-smi that lists a GPU): no venv, no apt, no index; the wheels go into
    the --target folder, which comes first on PYTHONPATH; then the torch check, which stops this CPU
    torch with exit 6 before any stage (a CUDA torch goes on to scripts/gpu_check.py --image)."""
    _wheel(tmp_path / "wheels", "xdc_probe_pkg", "0.3")
    proc = _image_mode(tmp_path, tmp_path / "wheels")
    assert proc.returncode == 6, proc.stderr
    assert "[gpu-check] image mode: " in proc.stdout and "1 wheels from" in proc.stdout
    assert (tmp_path / "site" / "xdc_probe_pkg" / "__init__.py").read_text() == "VERSION = '0.3'\n"
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"Error: image mode: the torch of {sys.executable} is not a CUDA build")
    assert not (tmp_path / "venv").exists()
    log = (tmp_path / "out" / "install.log").read_text()
    assert "xdc_probe_pkg-0.3-py3-none-any.whl" in log

    proc = _image_mode(tmp_path, tmp_path / "none")  # nothing carried
    assert proc.returncode == 6
    none = tmp_path / "none"
    assert proc.stderr.splitlines() == [
        f"Error: image mode: no wheels in {none}/ (run bash scripts/gpu_wheels.sh where an index is "
        f"reachable, and carry {none})"
    ]
    proc = _image_mode(tmp_path, tmp_path / "wheels", GPU_CHECK_IMAGE="maybe")
    assert (
        proc.returncode == 2
        and "GPU_CHECK_IMAGE='maybe': 1 (image mode), 0 (full mode) or auto" in proc.stderr
    )


# --- scripts/gpu_wheels.py ----------------------------------------------------------------------


def test_wheel_closure_and_what_a_run_call_carries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    have = tmp_path / "ok"
    _wheel(have, "alpha", "1.0", ("beta>=2", "numpy>=1.24", 'gamma; extra == "docs"',
                                  'delta; python_version < "3.0"'))  # fmt: skip
    _wheel(have, "beta", "2.1")
    _wheel(have, "typing_extensions", "4.16.0")  # in the image, carried on purpose (pydantic needs >= 4.16)
    assert wheels.closure_problems(sorted(have.glob("*.whl")), "3.12") == []

    bad = tmp_path / "bad"
    _wheel(bad, "alpha", "1.0", ("beta>=2", "missing-thing", 'py312only; python_version >= "3.12"'))
    _wheel(bad, "beta", "1.5")
    _wheel(bad, "click", "8.0")  # the image has click
    problems = wheels.closure_problems(sorted(bad.glob("*.whl")), "3.12")
    alpha = "alpha-1.0-py3-none-any.whl needs"
    assert sorted(problems) == sorted([
        f"{alpha} beta>=2, the carried beta is 1.5",
        f"{alpha} missing-thing: neither carried nor in the image",
        f'{alpha} py312only; python_version >= "3.12": neither carried nor in the image',
        "click is in the image already: carrying it shadows the image's version",
    ])  # fmt: skip
    assert not any("py312only" in p for p in wheels.closure_problems(sorted(bad.glob("*.whl")), "3.11"))
    _wheel(bad / "again", "beta", "2.0")
    two = wheels.closure_problems([*bad.glob("*.whl"), *(bad / "again").glob("*.whl")], "3.12")
    assert "two wheels of beta: pip stops the whole install" in two

    # what travels: tracked and untracked-not-ignored files, shared/, the wheels, other carried paths
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".whl/\nbig.bin\nmedia/\n")
    (repo / "a.txt").write_bytes(b"x" * 100)
    (repo / "big.bin").write_bytes(b"x" * 5000)  # ignored: does not travel
    (repo / "shared").mkdir()
    (repo / "shared" / "clip.bin").write_bytes(b"x" * 30)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "w.whl").write_bytes(b"x" * 50)
    (repo / "media").mkdir()
    (repo / "media" / "c.mp4").write_bytes(b"x" * 7)
    tree, files = wheels.tree_bytes(repo)
    assert (tree, files) == (100 + len(".whl/\nbig.bin\nmedia/\n") + 30, 2)
    sizes = wheels.measure(repo / ".whl", [repo / "media"], repo)
    assert sizes == {"tree": tree, "wheels": 50, "other": 7, "total": tree + 57}

    # the limit: this repository and an empty wheel folder fit; over the limit, exit 1 and why
    (tmp_path / "empty").mkdir()
    assert wheels.main(["--measure", "--dest", str(tmp_path / "empty")]) == 0
    monkeypatch.setattr(wheels, "LIMIT_BYTES", 1000)
    assert wheels.main(["--measure", "--dest", str(tmp_path / "empty")]) == 1


# --- the step and DDP tests' inputs without DALI, and the tests' skips ------------------------------


def test_synthetic_batch_has_the_loaders_shapes_and_scale() -> None:
    batch = H.synthetic_batch(4, frames=8, crop=112, seed=0)
    assert batch["video"].shape == (4, 3, 8, 112, 112) and batch["audio"].shape == (4, 1, 40, 100)
    assert batch["video"].dtype == batch["audio"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["label"].tolist() == [-1] * 4
    for key in ("video", "audio"):
        x = batch[key]
        assert abs(float(x.mean())) < 0.2 and 0.9 < float(x.std()) < 1.1, key
        # smooth like pictures and spectrograms: neighbouring values are strongly correlated
        a, b = x[..., :-1].flatten(), x[..., 1:].flatten()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8, key
    again, other = H.synthetic_batch(4, seed=0), H.synthetic_batch(4, seed=1)
    assert torch.equal(again["video"], batch["video"]) and torch.equal(again["audio"], batch["audio"])
    assert not torch.equal(other["video"], batch["video"])


def test_input_mode_and_child_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(H.INPUTS_ENV, "synthetic")
    assert H.input_mode() == "synthetic"
    monkeypatch.setenv(H.INPUTS_ENV, "loader")
    assert H.input_mode() == "loader"
    monkeypatch.setenv(H.INPUTS_ENV, "pixels")
    with pytest.raises(ValueError, match="'loader' or 'synthetic'"):
        H.input_mode()
    monkeypatch.delenv(H.INPUTS_ENV)
    assert H.input_mode() == ("loader" if H.missing_reason("dali") is None else "synthetic")

    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    env = H.child_env("/x/tests", OMP_NUM_THREADS="4")
    assert env["PYTHONPATH"] == os.pathsep.join(["/x/tests", str(ROOT), "/tmp/site"])
    assert env["OMP_NUM_THREADS"] == "4"
    launcher = H.torchrun()
    assert Path(launcher[0]).is_file() and (
        len(launcher) == 1 or launcher[1:] == ["-m", "torch.distributed.run"]
    )


def test_missing_dependencies_skip_the_tests_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    monkeypatch.delenv(H.IMAGE_ENV, raising=False)
    if faiss.get_num_gpus() == 0:  # this CPU machine's faiss-cpu
        why = H.missing_reason("faiss-gpu")
        assert why == (f"faiss {faiss.__version__} is a CPU build (faiss-cpu): install xdctools[gpu] "
                       "(faiss-gpu-cu12), not faiss-cpu")  # fmt: skip
        monkeypatch.setenv(H.IMAGE_ENV, "1")
        assert "no faiss GPU build for this CUDA 13 image can be carried" in H.missing_reason("faiss-gpu")
        with pytest.raises(pytest.skip.Exception, match="is a CPU build"):
            H.require("shard-tools", "faiss-gpu")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    assert H.missing_reason("dali").startswith("nvidia-dali not importable (ModuleNotFoundError")
    assert H.input_mode() == "synthetic"
    assert H.missing_reason("shard-tools") is None  # PyAV, librosa, webdataset, ffmpeg here
    with pytest.raises(ValueError, match="unknown requirement"):
        H.missing_reason("a-gpu")


# --- the shard building step ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gpu-check-shards")
    sets = "synth-vp9,synth-h264,long-vp9,media-vp9"
    argv = [sys.executable, str(SCRIPT), "--build-shards", str(root), "--small", "--media", "none"]
    subprocess.run([*argv, "--sets", sets, "--workers", "2"], check=True, capture_output=True, timeout=600)
    manifest = H.load_manifest(root)
    manifest["root"] = str(root)
    return manifest


@pytest.mark.slow
def test_build_shards_makes_both_codecs(small_shards: dict) -> None:
    from trainer.data import find_shards

    assert sorted(small_shards["sets"]) == ["long-vp9", "synth-h264", "synth-vp9"]
    assert small_shards["missing"]["media-vp9"].startswith("no real clips at")
    exts = {name: find_shards(s["path"], "train").video_ext for name, s in small_shards["sets"].items()}
    assert exts == {"synth-vp9": "webm", "synth-h264": "mp4", "long-vp9": "webm"}
    for name, s in small_shards["sets"].items():
        shards = find_shards(s["path"], "train")
        assert shards.short_side == s["short_side"] == 128, name
    long_segments = H.segments(small_shards["sets"]["long-vp9"]["path"])
    assert len(long_segments) == 1 and long_segments[0]["info"]["num_frames"] == 300  # frame 280 is inside
    with pytest.raises(pytest.skip.Exception, match="media-vp9 was not built: no real clips"):
        H.shard_set(small_shards, "media-vp9")


# --- decoding reference and tolerance ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_vp9(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real Kinetics clips as VP9 shards, short side 128."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan
    from xdctools.shard.run import run_shard

    root = tmp_path_factory.mktemp("real")
    (root / "videos" / "k").mkdir(parents=True)
    for clip in (
        "using segway/R6llTwEh07w_000000_000010.mp4",
        "arm wrestling/mmaction2_demo_armwrestling.mp4",
    ):
        (root / "videos" / "k" / Path(clip).name).symlink_to(media_dir / "kinetics" / clip)
    run_shard(build_plan(root / "videos"), ShardParams(short_side=128), root / "shards", workers=2)
    return root / "shards"


def _pyav_rgb(encoded: bytes, frames: list[int]) -> np.ndarray:
    with av.open(io.BytesIO(encoded)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([decoded[min(i, len(decoded) - 1)] for i in frames])


def _decode_cases(root: str | Path) -> list[tuple[dict, list[int], np.ndarray]]:
    samples = [(s, f) for s in H.segments(root, limit=3) for f in H.clip_frames(s["info"]["num_frames"])]
    dali = H.dali_decode([s["video"] for s, _ in samples], [f for _, f in samples], "cpu")
    return [(s, f, d) for (s, f), d in zip(samples, dali, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["synth", "real"])
def test_reference_and_tolerance_against_dali_cpu(which: str, small_shards: dict, request) -> None:
    root = (
        small_shards["sets"]["synth-vp9"]["path"] if which == "synth" else request.getfixturevalue("real_vp9")
    )
    for seg, frames, dali in _decode_cases(root):
        what = f"{which} {seg['key']} from frame {frames[0]}"
        # our reference conversion of FFmpeg's planes is DALI's CPU decoder, to rounding
        assert H.pixel_difference(dali, H.reference_clip(seg["video"], frames))["max"] <= 1, what
        # accepted: other chroma upsampling and rounding (nearest; FFmpeg's own rgb24 conversion)
        nearest = H.pixel_difference(dali, H.reference_clip(seg["video"], frames, chroma="nearest"))
        assert H.decode_close(nearest) and nearest["luma_p999"] <= 10, (what, nearest)
        ffmpeg = H.pixel_difference(dali, _pyav_rgb(seg["video"], frames))
        assert H.decode_close(ffmpeg), (what, ffmpeg)
        # rejected: full instead of limited range; a clip one frame late (by luma, whatever the colours)
        full = H.pixel_difference(dali, H.reference_clip(seg["video"], frames, full_range=True))
        assert not H.decode_close(full) and full["luma_mean"] > 4.5, (what, full)
        late = [min(f + 1, seg["info"]["num_frames"] - 1) for f in frames]
        later = H.pixel_difference(dali, H.reference_clip(seg["video"], late, chroma="nearest"))
        assert not H.decode_close(later) and later["luma_p999"] > 40, (what, later)
        variant, fit = H.best_conversion(dali, seg["video"], frames)
        assert variant == "bt601 bilinear limited" and fit["max"] <= 1, what


@pytest.mark.slow
def test_h264_reference_decodes_the_same_frames(small_shards: dict) -> None:
    """H.264 members decode from memory in presentation order: each clip is closer to the VP9 encode of
    the same frames than to the next frames (two lossy encodes of one source: within the tolerance)."""
    vp9 = {
        (s["info"]["video"], s["info"]["segment"]): s
        for s in H.segments(small_shards["sets"]["synth-vp9"]["path"])
    }
    for seg in H.segments(small_shards["sets"]["synth-h264"]["path"]):
        other = vp9[(seg["info"]["video"], seg["info"]["segment"])]
        assert seg["info"]["num_frames"] == other["info"]["num_frames"]
        frames = list(range(8))
        dali = H.dali_decode([other["video"]], [frames], "cpu")[0]
        same = H.pixel_difference(dali, H.reference_clip(seg["video"], frames))
        late = H.pixel_difference(dali, H.reference_clip(seg["video"], [f + 1 for f in frames]))
        assert same["luma_p999"] < late["luma_p999"] and same["mean"] < 3.0, (same, late)


def test_pixel_difference_and_levels() -> None:
    a = np.zeros((2, 10, 10, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 200
    d = H.pixel_difference(a, b)
    assert d["max"] == 200 and d["mean"] == pytest.approx(200 / a.size) and d["p99"] == 0
    assert d["luma_mean"] == pytest.approx(0.299 * 200 / 200)  # one of 200 pixels, red only
    gray = np.full((8, 16, 16, 3), 100, np.uint8)  # a grey clip 10 levels brighter: luma moves by 10
    d = H.pixel_difference(gray, gray + 10)
    assert d["luma_mean"] == pytest.approx(10) and d["luma_p999"] == pytest.approx(10)
    channels_first = H.pixel_difference(gray.transpose(3, 0, 1, 2), (gray + 10).transpose(3, 0, 1, 2), 0)
    assert channels_first == d
    with pytest.raises(ValueError, match="shapes differ"):
        H.pixel_difference(a, a[:1])
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 2, 4, 4)).astype(np.float64)
    normalised = (pixels / 255 - np.reshape(mean, (3, 1, 1, 1))) / np.reshape(std, (3, 1, 1, 1))
    np.testing.assert_allclose(H.levels(normalised, mean, std), pixels, atol=1e-9)
    assert H.clip_frames(64) == [list(range(8)), list(range(32, 40))]
    assert H.clip_frames(5) == [list(range(5))]


# --- clustering agreement ---------------------------------------------------------------------


def test_label_agreement_helpers() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 16, 5000)
    permuted = rng.permutation(16)[labels]
    assert H.labels_nmi(labels, permuted) == pytest.approx(1.0)
    assert H.assert_labels_agree(labels, permuted, "permuted") == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="random: NMI"):
        H.assert_labels_agree(labels, rng.integers(0, 16, 5000), "random")

    dist = rng.uniform(1, 2, 5000).astype(np.float32)
    other_labels, other_dist = labels.copy(), dist.copy()
    other_labels[:3] = (labels[:3] + 1) % 16  # a tie broken the other way: same distance
    other_dist[3] += 0.5  # a real disagreement in distance
    other_labels[4] = (labels[4] + 1) % 16
    other_dist[4] += 1.0  # and a wrong label
    got = H.assignment_agreement(labels, other_labels, dist, other_dist, atol=1e-4)
    assert got["differing_rows"] == 4 and got["equal"] == pytest.approx(4996 / 5000)
    assert got["differing_are_ties"] == pytest.approx(3 / 4) and got["distances_close"] == pytest.approx(
        4998 / 5000
    )


@pytest.mark.slow
def test_kmeans_of_the_gpu_test_data_survives_rounding() -> None:
    """The GPU test's data: its k-means partition hardly moves when every value is perturbed by 1e-5
    (relative), far more than GPU vs CPU float32 arithmetic differs (measured: NMI 0.997 at 1e-6 and 1e-4,
    0.990 at 1e-3). So an NMI below 0.99 between GPU and CPU k-means is a fault, not rounding. (NMI with
    the true blobs is ~0.96: random initialisation merges a few blobs and splits others.)"""
    from xdctools.cluster import KMeansParams, cluster_array

    x, truth = H.separated_mixture(32_768, 128, 64, seed=0)
    noisy = (x * (1 + 1e-5 * np.random.default_rng(5).standard_normal(x.shape))).astype(np.float32)
    a = cluster_array(x, KMeansParams(k=64, niter=20, seed=0, gpu=False))
    b = cluster_array(noisy, KMeansParams(k=64, niter=20, seed=0, gpu=False))
    assert H.labels_nmi(a.labels, b.labels) >= 0.995
    assert H.labels_nmi(truth, a.labels) >= 0.9


# --- training step comparison and alignment -------------------------------------------------


def test_similarity_of_gradients() -> None:
    from trainer.models import r2plus1d_18

    torch.manual_seed(0)
    model = r2plus1d_18(width=0.125)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    same = H.similarity(grads, {n: g.clone() for n, g in grads.items()}, "layer1")
    assert same["cosine"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(1.0)
    # channels-last copies hold the same values: same vectors
    cl = {
        n: g.contiguous(memory_format=torch.channels_last_3d) if g.ndim == 5 else g for n, g in grads.items()
    }
    assert H.similarity(grads, cl)["cosine"] == pytest.approx(1.0)
    # the same memory read with the wrong layout (a channels-last bug) is another vector
    wrong = {n: g.permute(0, 2, 3, 4, 1).reshape(g.shape) if g.ndim == 5 else g for n, g in grads.items()}
    assert H.similarity(grads, wrong, "layer")["cosine"] < 0.2
    noisy = {n: g + 0.05 * torch.randn_like(g) for n, g in grads.items()}
    assert 0.99 < H.similarity(grads, noisy)["cosine"] < 1.0
    with pytest.raises(ValueError, match="no common tensors"):
        H.similarity(grads, grads, "nothing")


@pytest.mark.slow
def test_flash_and_click_check_on_cpu_clips(tmp_path: Path) -> None:
    """The GPU alignment test's check, on CPU-decoded clips of the same flash video (as test_data does)."""
    from trainer.data import ClipSpec, Runtime, find_shards, train_loader
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan
    from xdctools.shard.run import run_shard
    from xdctools.synth import write_flash_click

    write_flash_click(tmp_path / "videos" / "flash" / "flash.mp4", 2.5, seconds=5.0, fps=25)
    run_shard(build_plan(tmp_path / "videos"), ShardParams(short_side=128), tmp_path / "shards", workers=2)
    loader = train_loader(
        find_shards(tmp_path / "shards", "train"), batch_size=16, epoch_size=320, clip=ClipSpec(crop=96),
        run=Runtime(seed=1),
    )  # fmt: skip
    batches = list(loader)
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    seen = H.flash_and_click(rows, stride=1, flash_first=62, flash_frames=3, flash_time=2.5, fps=25)
    assert seen >= 3
    rows["frame"] = rows["frame"] + 1  # clips claimed one frame later: the check must notice
    with pytest.raises(AssertionError, match="bright"):
        H.flash_and_click(rows, stride=1, flash_first=62, flash_frames=3, flash_time=2.5, fps=25)


def test_record_appends_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "figures.jsonl"
    monkeypatch.setenv(H.FIGURES_ENV, str(path))
    H.record("a", value=np.float32(1.23456), n=np.int64(3), xs=(np.float64(0.5), 2))
    H.record("b", text="x")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"name": "a", "value": 1.2346, "n": 3, "xs": [0.5, 2]},
        {"name": "b", "text": "x"},
    ]
    monkeypatch.delenv(H.FIGURES_ENV)
    assert H.record("c", v=1) == {"name": "c", "v": 1}  # no file without the variable
    assert os.environ.get(H.FIGURES_ENV) is None
