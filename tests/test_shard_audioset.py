"""AudioSet through `xdctools shard`: real rows of balanced_train_segments.csv, real clips of
../shared/data/media linked under the names AudioSet downloaders write, the real class index; then the
shards, the trainer's catalog and `xdctools inspect`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trainer.data import find_shards
from trainer.extract import read_catalog
from xdctools.commands.inspect import inspect_cmd
from xdctools.commands.shard import shard
from xdctools.errors import InputError
from xdctools.shard import format as fmt
from xdctools.shard.plan import build_plan, detect_kind
from xdctools.shard.run import plan_fingerprint

NUM_CLASSES = 527


@dataclasses.dataclass(frozen=True)
class RealRow:
    line: str  # the csv line as it is in the file
    youtube_id: str
    start: float
    end: float
    mids: tuple[str, ...]


@pytest.fixture(scope="module")
def audioset(splits_dir: Path) -> Path:
    return splits_dir / "audioset"


@pytest.fixture(scope="module")
def real(audioset: Path) -> dict:
    """The real files read with the standard csv module (not the parser under test)."""
    lines = (audioset / "balanced_train_segments.csv").read_text().splitlines()
    rows = []
    for line in lines[3:]:
        ytid, start, end, labels = next(csv.reader([line], skipinitialspace=True))
        rows.append(RealRow(line, ytid, float(start), float(end), tuple(labels.split(","))))
    with (audioset / "class_labels_indices.csv").open(newline="") as f:
        classes = list(csv.DictReader(f))
    return {
        "comments": lines[:3],
        "rows": rows,
        "index": {c["mid"]: int(c["index"]) for c in classes},
        "names": [c["display_name"] for c in classes],
    }


def expected_indices(row: RealRow, real: dict) -> list[int]:
    return sorted({real["index"][mid] for mid in row.mids})


def pick(real: dict) -> dict[str, RealRow]:
    """Real rows for each naming: many labels, a fractional span, a span from 0, and one not on disk."""
    rows = real["rows"]
    integer = [r for r in rows if r.start.is_integer() and r.end.is_integer()]
    return {
        "kinetics_style": next(r for r in integer if len(r.mids) >= 4),
        "milliseconds": next(r for r in rows if not r.start.is_integer()),
        "untrimmed": next(r for r in integer if r.start == 0 and len(r.mids) >= 2),
        "missing": next(r for r in integer if len(r.mids) == 1),
    }


def link(target: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def write_csv(path: Path, real: dict, rows: list[RealRow]) -> Path:
    """A segments csv: the real comment lines, then the given real rows as they are in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*real["comments"], *(r.line for r in rows)]) + "\n")
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory, media_dir: Path, audioset: Path, real: dict) -> dict:
    """downloads/ holds three real clips under three downloaders' names; meta/ the csv and the class index."""
    base = tmp_path_factory.mktemp("audioset")
    rows = pick(real)
    k, ms, full = rows["kinetics_style"], rows["milliseconds"], rows["untrimmed"]
    edge = media_dir / "edge"
    link(
        edge / "big_buck_bunny_small.mp4",
        base / "downloads" / f"{k.youtube_id}_{k.start:06.0f}_{k.end:06.0f}.mp4",
    )
    link(
        edge / "realshort.mp4",
        base / "downloads" / "video" / f"{ms.youtube_id}_{ms.start * 1000:.0f}_{ms.end * 1000:.0f}.mp4",
    )
    link(edge / "mpeg4_mp3_stereo.avi", base / "downloads" / "full" / f"{full.youtube_id}.avi")
    csv_path = write_csv(base / "meta" / "balanced_train_segments.csv", real, list(rows.values()))
    link(audioset / "class_labels_indices.csv", base / "meta" / "class_labels_indices.csv")
    return {"base": base, "rows": rows, "csv": csv_path, "root": base / "downloads"}


@pytest.fixture(scope="module")
def sharded(collection: dict) -> Path:
    out = collection["base"] / "shards"
    args = [str(collection["root"]), "--csv", str(collection["csv"]), "-o", str(out), "--short-side", "64"]
    result = CliRunner().invoke(shard, [*args, "--workers", "1", "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert "ok: 3 videos" in result.output and "annotated but not found: 1" in result.output
    return out


def samples_of(out: Path) -> list[dict[str, bytes]]:
    """Every sample of every tar in dataset order, members in stored order."""
    dataset = json.loads((out / "dataset.json").read_text())
    samples: list[dict[str, bytes]] = []
    for entry in dataset["files"]:
        with tarfile.open(out / entry["tar"]) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["key"] != key.encode():
                    samples.append({"key": key.encode()})
                samples[-1][ext] = tf.extractfile(member).read()
    return samples


# --- the plan: names on disk ------------------------------------------------------------------------
def test_the_csv_kind_is_detected_and_rows_found_by_each_naming(collection: dict, real: dict) -> None:
    rows, root = collection["rows"], collection["root"]
    assert detect_kind(root, csv=collection["csv"]) == "audioset-csv"
    plan = build_plan(root, csv=collection["csv"])
    assert plan.kind == "audioset-csv" and plan.multi_label and plan.audio_required
    assert plan.classes == real["names"] and plan.class_ids == list(real["index"])
    (jobs,) = plan.sets.values()
    assert list(plan.sets) == ["balanced_train"]
    by_id = {dict(j.extra)["youtube_id"]: j for j in jobs}
    k, ms, full = (rows[n] for n in ("kinetics_style", "milliseconds", "untrimmed"))
    assert by_id[k.youtube_id].name == f"{k.youtube_id}_{int(k.start):06d}_{int(k.end):06d}.mp4"
    assert (
        by_id[ms.youtube_id].name
        == f"video/{ms.youtube_id}_{round(ms.start * 1000)}_{round(ms.end * 1000)}.mp4"
    )
    assert by_id[full.youtube_id].name == f"full/{full.youtube_id}.avi#t={full.start:g},{full.end:g}"
    assert (by_id[full.youtube_id].start, by_id[full.youtube_id].end) == (full.start, full.end)
    assert by_id[k.youtube_id].start is None and by_id[ms.youtube_id].start is None  # already trimmed
    for row in (k, ms, full):
        job = by_id[row.youtube_id]
        assert list(job.class_indices) == expected_indices(row, real)
        assert list(job.labels) == [real["names"][i] for i in expected_indices(row, real)]
        assert job.label is None and job.class_index == -1 and not job.audio_only
    missing = rows["missing"]
    assert plan.missing == [
        {
            "path": f"{missing.youtube_id}#t={missing.start:g},{missing.end:g}",
            "reason": "missing_file",
            "set": "balanced_train",
        }
    ]


def test_panns_names_and_audio_only_downloads(tmp_path: Path, shared_dir: Path, real: dict) -> None:
    """`Y<id>.wav` (PANNs' audioset_tagging_cnn): trimmed audio. It says nothing of the span, so a video with
    two rows in the csv is not matched by it; a video file of the same row wins over an audio file."""
    rows = pick(real)
    one, two = rows["kinetics_style"], rows["missing"]
    wav = shared_dir / "data" / "fsdd" / "recordings" / "0_george_0.wav"
    link(wav, tmp_path / "wav" / f"Y{one.youtube_id}.wav")
    link(wav, tmp_path / "wav" / f"Y{two.youtube_id}.wav")
    later = f'{two.youtube_id}, {two.end:.3f}, {two.end + 10:.3f}, "{",".join(two.mids)}"'
    csv_path = write_csv(
        tmp_path / "meta" / "eval_segments.csv", real, [one, two, dataclasses.replace(two, line=later)]
    )
    classes = shared_dir / "data" / "splits" / "audioset" / "class_labels_indices.csv"
    plan = build_plan(tmp_path / "wav", csv=csv_path, classes=classes, set_name="mine")
    assert list(plan.sets) == ["mine"]  # an explicit set name wins over the csv's name
    (job,) = plan.sets["mine"]
    assert job.name == f"Y{one.youtube_id}.wav" and job.audio_only and job.start is None
    assert len(plan.missing) == 2  # both rows of the video listed twice
    link(
        shared_dir / "data" / "media" / "edge" / "realshort.mp4", tmp_path / "wav" / f"Y{one.youtube_id}.mp4"
    )
    (job,) = build_plan(tmp_path / "wav", csv=csv_path, classes=classes).sets["eval"]
    assert job.name == f"Y{one.youtube_id}.mp4" and not job.audio_only


# --- errors: one line, naming the file and the reason ------------------------------------------------
def test_errors_name_the_file_and_the_reason(
    collection: dict, real: dict, audioset: Path, splits_dir: Path, tmp_path: Path
) -> None:
    root = collection["root"]
    row = collection["rows"]["kinetics_style"]
    bad_id = write_csv(
        tmp_path / "a" / "eval_segments.csv",
        real,
        [dataclasses.replace(row, line=row.line.replace(row.mids[-1], "/m/xyz"))],
    )
    classes = audioset / "class_labels_indices.csv"
    with pytest.raises(InputError, match=rf"eval_segments\.csv:4: class id '/m/xyz' is not in {classes}$"):
        build_plan(root, csv=bad_id, classes=classes)
    with pytest.raises(
        InputError, match=r"eval_segments\.csv: no class_labels_indices\.csv beside it \(pass"
    ):
        build_plan(root, csv=bad_id)  # nothing beside it and no --classes
    truncated = ", ".join(row.line.split(", ")[:3])  # the label list cut off
    malformed = write_csv(tmp_path / "b" / "x.csv", real, [dataclasses.replace(row, line=truncated)])
    with pytest.raises(InputError, match=r"x\.csv:4: malformed row"):
        build_plan(root, csv=malformed, classes=classes)
    empty = write_csv(
        tmp_path / "c" / "x.csv",
        real,
        [dataclasses.replace(row, line=f'{row.youtube_id}, 0.000, 10.000, ""')],
    )
    with pytest.raises(InputError, match=r"x\.csv:4: empty label list"):
        build_plan(root, csv=empty, classes=classes)
    ucf = splits_dir / "ucf101" / "ucfTrainTestlist" / "classInd.txt"
    with pytest.raises(InputError, match=rf"{ucf}: not an AudioSet class index: header '1 ApplyEyeMakeup'"):
        build_plan(root, csv=collection["csv"], classes=ucf)
    result = CliRunner().invoke(
        shard, [str(root), "--csv", str(bad_id), "--classes", str(classes), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == InputError.exit_code
    assert (
        result.output.count("\n") == 1 and result.output.startswith("Error: ") and "'/m/xyz'" in result.output
    )


# --- the shards ---------------------------------------------------------------------------------------
def test_label_lists_in_the_shards_are_the_csv_mids_through_the_class_index(
    sharded: Path, collection: dict, real: dict
) -> None:
    dataset = json.loads((sharded / "dataset.json").read_text())
    assert dataset["kind"] == "audioset-csv" and dataset["multi_label"] is True
    assert dataset["classes"] == real["names"] and dataset["class_ids"] == list(real["index"])
    assert list(dataset["sets"]) == ["balanced_train"] and dataset["failures_by_reason"] == {
        "missing_file": 1
    }
    rows = {r.youtube_id: r for r in collection["rows"].values()}
    seen = set()
    for sample in samples_of(sharded):
        meta = json.loads(sample["json"])
        info = fmt.decode_info(sample["info.npy"])
        expected = expected_indices(rows[meta["youtube_id"]], real)
        labels = np.load(io.BytesIO(sample["labels.npy"]))
        assert labels.dtype == np.int64 and labels.tolist() == expected
        assert sample["labels.npy"][6:8] == b"\x01\x00"  # npy format v1.0, the version DALI reads
        assert meta["class_indices"] == expected and meta["labels"] == [real["names"][i] for i in expected]
        assert meta["label"] is None and meta["class_index"] == -1 and info["label"] == -1
        assert "cls" not in sample  # no single class
        assert [e for e in sample if e != "key"] == [e for e in fmt.MEMBER_ORDER if e in sample]
        seen.add(meta["youtube_id"])
    assert seen == {r.youtube_id for n, r in collection["rows"].items() if n != "missing"}


def test_catalog_carries_the_label_lists_aligned_with_videos(
    sharded: Path, collection: dict, real: dict
) -> None:
    shards = find_shards(sharded, "balanced_train")
    catalog = read_catalog(shards)
    assert catalog.multi_label and not catalog.has_labels and (catalog.labels == -1).all()
    video_ids = {}
    for sample in samples_of(sharded):
        video_ids[fmt.decode_info(sample["info.npy"])["video"]] = json.loads(sample["json"])["youtube_id"]
    rows = {r.youtube_id: r for r in collection["rows"].values()}
    expected = [expected_indices(rows[video_ids[int(v)]], real) for v in catalog.videos]
    assert (
        catalog.videos.tolist() == sorted(video_ids) and len(catalog.label_offsets) == catalog.num_videos + 1
    )
    assert [catalog.label_set(r).tolist() for r in range(catalog.num_videos)] == expected
    picked = np.array([2, 0, 2])
    dense = np.zeros((3, NUM_CLASSES), np.float32)
    for i, row in enumerate(picked):
        dense[i, expected[row]] = 1
    hot = catalog.multi_hot(picked, NUM_CLASSES)
    assert hot.dtype == np.float32 and np.array_equal(hot, dense)
    assert len(catalog.sample_video) == len(shards) > catalog.num_videos  # several segments per video


def test_inspect_says_multi_label_and_lists_the_labels(sharded: Path, real: dict, tmp_path: Path) -> None:
    first = samples_of(sharded)[0]
    meta = json.loads(first["json"])
    png = tmp_path / "sample.png"
    result = CliRunner().invoke(
        inspect_cmd, [str(sharded), "--key", first["key"].decode(), "--png", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "labels: multi-label" in result.output
    listed = ", ".join(f"{real['names'][i]} ({i})" for i in meta["class_indices"])
    assert f"labels ({len(meta['class_indices'])}): {listed}" in result.output
    assert png.stat().st_size > 10_000


def test_single_label_shards_are_unchanged(media_dir: Path, tmp_path: Path) -> None:
    """No labels.npy, no new JSON keys, and the plan hash of before multi-label sets (params.json unchanged,
    so folders written earlier still resume). A byte comparison against the previous code is in the notes."""
    plan = build_plan(media_dir / "hmdb51")
    old = hashlib.sha256()
    old.update(json.dumps([plan.kind, plan.classes]).encode())
    for set_name, jobs in plan.sets.items():
        old.update(set_name.encode())
        for job in jobs:
            old.update(json.dumps(dataclasses.astuple(job)[:-2], default=str).encode())  # the fields it had
    assert plan_fingerprint(plan) == old.hexdigest()
    out = tmp_path / "out"
    args = [str(media_dir / "hmdb51"), "-o", str(out), "--short-side", "64", "--workers", "1"]
    assert CliRunner().invoke(shard, [*args, "--audio", "optional"]).exit_code == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert "multi_label" not in dataset and "class_ids" not in dataset
    for sample in samples_of(out):
        assert [e for e in sample if e != "key"] == ["cls", "info.npy", "json", "mel.npy", "webm"]
        assert not {"labels", "class_indices"} & set(json.loads(sample["json"]))
