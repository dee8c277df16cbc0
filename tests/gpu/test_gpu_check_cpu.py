"""What `make gpu-check` computes without a GPU, run everywhere (not marked `gpu`, never skipped):

- the stage runner (scripts/gpu_check.py): time limits that kill a hung stage and its children, figures
  kept from a stage cut off, results.jsonl and report.md written after every stage, the budget, stages
  that depend on a failed one, SIGTERM, the report rebuilt from results.jsonl, pytest output parsing;
- scripts/gpu_check.sh without a CUDA device: one line, exit 6, at once, nothing installed;
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
from pathlib import Path

import av
import gpu_helpers as H
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SHELL = ROOT / "scripts" / "gpu_check.sh"


def _load_runner():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


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
    from xdctools.cluster import cluster_array

    x, truth = H.separated_mixture(32_768, 128, 64, seed=0)
    noisy = (x * (1 + 1e-5 * np.random.default_rng(5).standard_normal(x.shape))).astype(np.float32)
    a = cluster_array(x, k=64, niter=20, seed=0, gpu=False)
    b = cluster_array(noisy, k=64, niter=20, seed=0, gpu=False)
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
