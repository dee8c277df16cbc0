"""The shard run on real media: every file accounted for, DALI reads it all, resume after SIGKILL, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tqdm import tqdm

from trainer.data import find_shards
from xdctools.commands.shard import ByteSize, shard
from xdctools.errors import ConfigError
from xdctools.shard import format as fmt
from xdctools.shard.media import process_job
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import InternalError, Summary, make_units, node_units, run_shard

SHORT_SIDE = 64
# Inputs whose failure reason is known from the file itself (with audio optional).
EDGE_REASONS = {
    "empty.mp4": "empty_file",
    "truncated_R6llTwEh07w.mp4": "unreadable",
    "jpeg_named_mp4.mp4": "not_a_video",
    "corrupted_nal.mp4": "corrupt_stream",
    "rotated_90.mov": "too_short",  # 3 frames
}


def tar_members(out: Path) -> dict[str, bytes]:
    """Every member of every tar under `out`, by 'set/member name'."""
    members = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[f"{tar_path.parent.name}/{m.name}"] = tar.extractfile(m).read()
    return members


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- every file of the collection, sharded or reported ----------------------------------------


@pytest.fixture(scope="module")
def full_runs(media_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, Summary, list]]:
    """Kinetics as pretraining (audio required); HMDB51, UCF-101 and the edge cases with audio optional."""
    out = tmp_path_factory.mktemp("full")
    runs = {}
    for name, audio in (("kinetics", None), ("hmdb51", False), ("UCF-101", False), ("edge", False)):
        plan = build_plan(media_dir / name)
        params = ShardParams(
            short_side=SHORT_SIDE, audio_required=plan.audio_required if audio is None else audio
        )
        calls: list = []
        summary = run_shard(
            plan,
            params,
            out / name,
            shard_size=4,
            max_shard_bytes=400_000 if name == "edge" else None,
            workers=2,
            progress=lambda *args, calls=calls: calls.append(args),
        )
        runs[name] = (out / name, summary, calls)
    return runs


def test_every_file_is_sharded_or_reported(media_dir: Path, full_runs):
    all_files = {str(p) for p in media_dir.rglob("*") if p.is_file()}
    sharded: set[str] = set()
    failed: dict[str, str] = {}
    for name, (out, summary, calls) in full_runs.items():
        assert summary.complete and not list(out.rglob("*.tmp")), name
        dataset = json.loads((out / "dataset.json").read_text())
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        members = tar_members(out)
        sources = {json.loads(v)["source"]["path"] for k, v in members.items() if k.endswith(".json")}
        assert not sources & set(failed) and not sources & sharded
        sharded |= sources
        failed |= {e["path"]: e["reason"] for e in errors}
        # The counts add up: per set, per shard, per reason, and against the tars themselves.
        totals = dataset["totals"]
        assert totals["ok"] == len(sources) == summary.ok
        assert totals["failed"] == len(errors) == sum(summary.failed.values())
        assert totals["ok"] + totals["failed"] == totals["videos"]
        assert dataset["failures_by_reason"] == dict(Counter(e["reason"] for e in errors)) == summary.failed
        shards = [s for st in dataset["sets"].values() for s in st["shards"]]
        assert sorted(s["tar"] for s in shards) == sorted(
            p.relative_to(out).as_posix() for p in out.glob("*/*.tar")
        )
        assert [(f["tar"], f["idx"]) for f in dataset["files"]] == [(s["tar"], s["idx"]) for s in shards]
        assert sum(s["samples"] for s in shards) == totals["samples"]
        for s in shards:
            assert s["bytes"] == (out / s["tar"]).stat().st_size
            assert int((out / s["idx"]).read_text().split()[1]) == s["samples"]
        assert sum(s["samples"] for s in shards) == sum(1 for k in members if k.endswith(".info.npy"))
        assert totals["bytes"] == sum(s["bytes"] for s in shards) == summary.bytes
        assert calls[0][:2] == (0, totals["videos"]) and calls[-1] == (
            totals["videos"],
            totals["videos"],
            totals["ok"],
            totals["failed"],
        )
    assert sharded | set(failed) == all_files
    edge = media_dir / "edge"
    for file_name, reason in EDGE_REASONS.items():
        assert failed[str(edge / file_name)] == reason
    # Pretraining drops a video without audio; downstream sets keep theirs.
    assert failed[str(media_dir / "kinetics/arm wrestling/mmaction2_demo_armwrestling.mp4")] == "no_audio"
    assert str(edge / "h264_no_audio.mp4") in sharded
    # Rolling by bytes happened on real data, and every part is within the limit or holds one video.
    edge_sets = json.loads((full_runs["edge"][0] / "dataset.json").read_text())["sets"]
    parts = edge_sets["train"]["shards"]
    assert any(p["tar"].endswith("-01.tar") for p in parts)
    assert all(p["bytes"] <= 400_000 or p["videos"] == 1 for p in parts)


def test_labels_of_the_class_tree(full_runs):
    out = full_runs["kinetics"][0]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["classes"] == ["arm wrestling", "flipping pancake", "using segway"]
    members = tar_members(out)
    labels = {}
    for name, data in members.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            labels[meta["source"]["name"]] = (meta["label"], meta["class_index"])
            assert members[name[: -len("json")] + "cls"] == str(meta["class_index"]).encode()
    segway = {k: v for k, v in labels.items() if k.startswith("using segway/")}
    assert len(segway) == 3 and set(segway.values()) == {("using segway", 2)}


def test_dali_reads_every_sample_and_decodes_it(full_runs):
    from nvidia.dali import fn, pipeline_def

    for name, (out, _, _) in full_runs.items():
        dataset = json.loads((out / "dataset.json").read_text())
        tars = [str(out / f["tar"]) for f in dataset["files"]]
        idxs = [str(out / f["idx"]) for f in dataset["files"]]
        n = dataset["totals"]["samples"]
        sizes = {}  # (video, segment) -> (height, width, frames) from the json member
        for key, data in tar_members(out).items():
            if key.endswith(".json"):
                meta = json.loads(data)
                v, s = meta["key"].split("_")[0], meta["segment"]
                sizes[(int(v[1:]), s["index"])] = (
                    meta["video"]["height"],
                    meta["video"]["width"],
                    s["num_frames"],
                )

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe(tars=tars, idxs=idxs):
            video, mel, info = fn.readers.webdataset(
                paths=tars,
                index_paths=idxs,
                ext=["webm", "mel.npy", "info.npy"],
                missing_component_behavior="error",
                name="reader",
            )
            return fn.decoders.video(video, device="cpu"), fn.decoders.numpy(mel), fn.decoders.numpy(info)

        p = pipe()
        p.build()
        assert p.epoch_size("reader") == n, name
        seen = set()
        for _ in range(n):
            frames, mel, info = (np.array(x[0]) for x in p.run())
            fields = fmt.decode_info(info)
            seen.add((fields["video"], fields["segment"]))
            height, width, count = sizes[(fields["video"], fields["segment"])]
            assert frames.shape == (fields["num_frames"], height, width, 3) and count == fields["num_frames"]
            assert min(height, width) == SHORT_SIDE and frames.dtype == np.uint8
            assert mel.dtype == np.float16 and mel.shape == (fmt.N_MELS, fields["mel_frames"])
        assert seen == set(sizes), name  # every sample once


# --- determinism, resume, workers, nodes ------------------------------------------------------

KILL_SCRIPT = """
import sys
from xdctools.shard.media import process_job
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import run_shard

tree, out = sys.argv[1:3]
plan = build_plan(tree)
params = ShardParams(short_side={short}, audio_required=False)
run_shard(plan, params, out, shard_size=2, max_shard_bytes={max_bytes})
"""
MAX_BYTES = 150_000


@pytest.fixture(scope="module")
def tree(class_tree: Path) -> Path:
    """The class tree of real clips shared with other shard tests (conftest: 4 units of 2 videos)."""
    return class_tree


def shard_tree(tree: Path, out: Path, **kwargs) -> Summary:
    params = ShardParams(short_side=SHORT_SIDE, audio_required=False)
    return run_shard(build_plan(tree), params, out, shard_size=2, max_shard_bytes=MAX_BYTES, **kwargs)


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    summary = shard_tree(tree, out, workers=1)
    assert summary.complete and summary.units_written == 4
    return output_files(out)


def test_reference_layout(reference):
    names = sorted(reference)
    assert names[:3] == ["dataset.json", "errors.jsonl", "params.json"]
    markers = [n for n in names if n.endswith(".stats.json")]
    assert markers == [f"train/train-{u:06d}.stats.json" for u in range(4)]
    unit1 = json.loads(reference["train/train-000001.stats.json"])  # empty.mp4 and the truncated file
    assert unit1["parts"] == [] and [f["reason"] for f in unit1["failures"]] == ["empty_file", "unreadable"]
    assert not any(n.startswith("train/train-000001-") for n in names)  # no empty tar
    assert any(n.endswith("-01.tar") for n in names)  # a unit rolled over by bytes


def test_two_workers_write_identical_files(tree: Path, tmp_path: Path, reference):
    summary = shard_tree(tree, tmp_path, workers=2)
    assert summary.units_written == 4 and output_files(tmp_path) == reference


def test_nodes_write_disjoint_files_whose_union_is_the_single_node_run(tree: Path, tmp_path: Path, reference):
    units = make_units(build_plan(tree), 2)
    assert [u.number for u in node_units(units, 0, 2)] == [0, 2]
    first = shard_tree(tree, tmp_path, workers=1, node_rank=0, num_nodes=2)
    assert not first.complete and not (tmp_path / "dataset.json").exists()
    files0 = output_files(tmp_path)
    assert {n.split("-")[1][:6] for n in files0 if n.startswith("train/")} == {"000000", "000002"}
    second = shard_tree(tree, tmp_path, workers=1, node_rank=1, num_nodes=2)
    assert second.complete  # the last node to finish writes dataset.json
    files = output_files(tmp_path)
    files1 = {n for n in files if n not in files0 or n == "params.json"}
    assert {n.split("-")[1][:6] for n in files1 if n.startswith("train/")} == {"000001", "000003"}
    assert all(files[n] == data for n, data in files0.items())  # node 1 left node 0's files alone
    assert files == reference


def test_sigkill_then_rerun_gives_identical_files(tree: Path, tmp_path: Path, reference):
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(short=SHORT_SIDE, max_bytes=MAX_BYTES))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tree), str(out)], env=env, start_new_session=True
    )
    deadline = time.monotonic() + 120
    try:
        # Kill once a unit is complete and a later one is half-written.
        while time.monotonic() < deadline:
            markers = {p.name.split(".")[0] for p in out.glob("train/*.stats.json")}
            open_units = {p.name[: len("train-000000")] for p in out.glob("train/*.tar.tmp")}
            if markers and open_units - markers:
                break
            assert proc.poll() is None, "the run finished before it could be killed mid-unit"
            time.sleep(0.01)
        else:
            pytest.fail("no unit was being written within 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its ffmpeg children, as a scheduler would
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "dataset.json").exists()

    summary = shard_tree(tree, out, workers=2)
    assert summary.complete and summary.units_skipped >= 1 and summary.units_written >= 1
    assert not list(out.rglob("*.tmp"))
    assert output_files(out) == reference


def test_other_parameters_are_refused(tree: Path, tmp_path: Path, reference):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    plan = build_plan(tree)
    with pytest.raises(ConfigError, match=r"params\.json: output was made with different parameters.*crf"):
        run_shard(
            plan, ShardParams(short_side=SHORT_SIDE, crf=40), out, shard_size=2, max_shard_bytes=MAX_BYTES
        )
    with pytest.raises(ConfigError, match="shard_size: 2 -> 3"):
        run_shard(plan, ShardParams(short_side=SHORT_SIDE), out, shard_size=3, max_shard_bytes=MAX_BYTES)
    assert output_files(out) == reference  # nothing touched
    # Same parameters: everything is complete, nothing is redone.
    summary = shard_tree(tree, out)
    assert summary.units_skipped == 4 and summary.units_written == 0 and output_files(out) == reference
    # Leftovers of an interrupted unit are cleared when it is redone.
    (out / "train/train-000003.stats.json").unlink()
    (out / "train/train-000003-07.tar.tmp").write_bytes(b"partial")
    summary = shard_tree(tree, out)
    assert summary.units_written == 1 and output_files(out) == reference


def explode_on_empty(job, params):
    """The real processor, except that it raises on one file, as a processor bug would."""
    if job.name.endswith("empty.mp4"):
        raise RuntimeError("boom")
    return process_job(job, params)


def test_a_processor_that_raises_stops_the_run_and_blames_no_file(tree: Path, tmp_path: Path):
    plan = build_plan(tree)
    plan = dataclasses.replace(plan, sets={"train": plan.sets["train"][1:3]})  # a clip and empty.mp4
    with tqdm(file=io.StringIO()) as bar:
        with pytest.raises(InternalError, match=r"empty\.mp4: internal error while processing it") as raised:
            run_shard(
                plan, ShardParams(short_side=SHORT_SIDE), tmp_path, progress=bar, process=explode_on_empty
            )
        assert (bar.n, bar.total) == (1, 2)  # the clip before it was done; nothing after
    assert "(RuntimeError: boom)" in str(raised.value) and isinstance(raised.value.__cause__, RuntimeError)
    assert sorted(output_files(tmp_path)) == ["params.json"]  # no marker, no errors.jsonl, no tar, no .tmp


# --- the command ------------------------------------------------------------------------------


def test_shard_command(media_dir: Path, tmp_path: Path):
    clip = media_dir / "hmdb51/wave/TrumanShow_wave_f_nm_np1_fr_med_26.avi"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label\n{clip},wave\n{tmp_path / 'gone.mp4'},wave\n")
    out = tmp_path / "out"
    args = [str(manifest), "-o", str(out), "--short-side", "64", "--workers", "1", "--audio", "optional"]
    args += ["--shard-bytes", "1MB"]
    result = CliRunner().invoke(shard, args)
    assert result.exit_code == 0, result.output
    assert "ok: 1 videos, " in result.output and "annotated but not found: 1" in result.output
    assert f"errors: {out / 'errors.jsonl'}" in result.output
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["path"], e["reason"]) for e in errors] == [(str(tmp_path / "gone.mp4"), "missing_file")]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["parameters"]["max_shard_bytes"] == 1_000_000 and dataset["classes"] == ["wave"]
    assert dataset["parameters"]["shuffle_seed"] == 0  # shuffled order by default
    assert not find_shards(out, "train").name_ordered

    # A fatal error: one line, non-zero exit, nothing lost.
    before = output_files(out)
    result = CliRunner().invoke(shard, [*args, "--crf", "40"])
    assert result.exit_code == ConfigError.exit_code
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ") and "crf" in result.output
    assert output_files(out) == before
    result = CliRunner().invoke(shard, [*args, "--short-side", "63"])
    assert result.exit_code == ConfigError.exit_code and "short_side" in result.output
    result = CliRunner().invoke(shard, [str(tmp_path / "nowhere"), "-o", str(out)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_byte_sizes():
    size = ByteSize()
    assert [size.convert(v, None, None) for v in ("1GB", "500MB", "1.5GiB", "4096")] == [
        10**9,
        500 * 10**6,
        3 * 2**29,
        4096,
    ]
    with pytest.raises(Exception, match="not a size"):
        size.convert("12 parsecs", None, None)
