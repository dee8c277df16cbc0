"""AudioSet through `xdctools shard`: real rows of balanced_train_segments.csv (and eval_segments.csv),
real clips of ../shared/data/media linked under the names AudioSet downloaders write, the real class
index; then the shards, the trainer's catalog and `xdctools inspect`; then both csvs in one run."""

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
from xdctools.errors import ConfigError, InputError
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


def real_segments(path: Path) -> dict:
    """A real segments csv read with the standard csv module (not the parser under test)."""
    lines = path.read_text().splitlines()
    rows = []
    for line in lines[3:]:
        ytid, start, end, labels = next(csv.reader([line], skipinitialspace=True))
        rows.append(RealRow(line, ytid, float(start), float(end), tuple(labels.split(","))))
    return {"comments": lines[:3], "rows": rows}


@pytest.fixture(scope="module")
def real(audioset: Path) -> dict:
    """The real balanced csv and class index."""
    with (audioset / "class_labels_indices.csv").open(newline="") as f:
        classes = list(csv.DictReader(f))
    return {
        **real_segments(audioset / "balanced_train_segments.csv"),
        "index": {c["mid"]: int(c["index"]) for c in classes},
        "names": [c["display_name"] for c in classes],
    }


@pytest.fixture(scope="module")
def real_eval(audioset: Path) -> dict:
    return real_segments(audioset / "eval_segments.csv")


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


def relabelled(row: RealRow, mids: tuple[str, ...]) -> RealRow:
    """The same segment (its span as written in the file) with another label list."""
    span = ", ".join(row.line.split(", ")[:3])
    return RealRow(f'{span}, "{",".join(mids)}"', row.youtube_id, row.start, row.end, mids)


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


def shard_csvs(root: Path, csvs: list[Path], out: Path) -> str:
    """`xdctools shard ROOT --csv A [--csv B] -o OUT` at short side 64, 2 videos a unit; its output."""
    args = [str(root), *(arg for path in csvs for arg in ("--csv", str(path))), "-o", str(out)]
    result = CliRunner().invoke(shard, [*args, "--short-side", "64", "--workers", "1", "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def sharded(collection: dict) -> Path:
    out = collection["base"] / "shards"
    output = shard_csvs(collection["root"], [collection["csv"]], out)
    assert "ok: 3 videos" in output and "annotated but not found: 1" in output
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
            "source": f"{collection['csv']}:7",  # 3 comment lines, then the 4th row: its csv line
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


# --- several csvs in one run: a train set and an eval set in one folder -------------------------------
@pytest.fixture(scope="module")
def eval_collection(collection: dict, media_dir: Path, real_eval: dict) -> dict:
    """meta/eval_segments.csv beside the balanced csv: a real eval row on disk (downloads/eval/), one not
    on disk, and the balanced csv's fractional-span segment again with that eval row's labels (a user's
    lists may overlap; AudioSet's do not)."""
    labelled = [
        r for r in real_eval["rows"] if r.start.is_integer() and r.end.is_integer() and len(r.mids) >= 2
    ]
    on_disk, missing = labelled[:2]
    shared = relabelled(collection["rows"]["milliseconds"], on_disk.mids)
    assert set(shared.mids) != set(collection["rows"]["milliseconds"].mids)
    name = f"{on_disk.youtube_id}_{on_disk.start:06.0f}_{on_disk.end:06.0f}.webm"
    link(media_dir / "edge" / "big_buck_bunny_432_433.webm", collection["root"] / "eval" / name)
    rows = {"on_disk": on_disk, "shared": shared, "missing": missing}
    csv_path = write_csv(collection["base"] / "meta" / "eval_segments.csv", real_eval, list(rows.values()))
    return {"rows": rows, "csv": csv_path}


@pytest.fixture(scope="module")
def sharded_eval(collection: dict, eval_collection: dict) -> Path:
    out = collection["base"] / "shards-eval"
    output = shard_csvs(collection["root"], [eval_collection["csv"]], out)
    assert "ok: 2 videos" in output and "annotated but not found: 1" in output
    return out


@pytest.fixture(scope="module")
def sharded_both(collection: dict, eval_collection: dict) -> Path:
    out = collection["base"] / "shards-both"
    output = shard_csvs(collection["root"], [collection["csv"], eval_collection["csv"]], out)
    assert "ok: 5 videos" in output and "annotated but not found: 2" in output
    return out


def expected_by_set(collection: dict, eval_collection: dict, real: dict) -> dict[str, dict[str, list[int]]]:
    """Set -> YouTube id -> the class indices of that csv's row, for the rows on disk."""
    named = {"balanced_train": collection["rows"], "eval": eval_collection["rows"]}
    return {
        set_name: {r.youtube_id: expected_indices(r, real) for n, r in rows.items() if n != "missing"}
        for set_name, rows in named.items()
    }


def test_two_csvs_shard_into_one_folder_with_a_set_each(
    sharded_both: Path, collection: dict, eval_collection: dict, real: dict
) -> None:
    dataset = json.loads((sharded_both / "dataset.json").read_text())
    assert list(dataset["sets"]) == ["balanced_train", "eval"]
    assert dataset["kind"] == "audioset-csv" and dataset["multi_label"] is True
    assert dataset["classes"] == real["names"] and dataset["class_ids"] == list(real["index"])
    assert dataset["failures_by_reason"] == {"missing_file": 2}
    assert {s: dataset["sets"][s]["ok"] for s in dataset["sets"]} == {"balanced_train": 3, "eval": 2}
    expected = expected_by_set(collection, eval_collection, real)
    seen = set()
    for sample in samples_of(sharded_both):
        meta = json.loads(sample["json"])
        labels = np.load(io.BytesIO(sample["labels.npy"])).tolist()
        assert labels == meta["class_indices"] == expected[meta["set"]][meta["youtube_id"]]
        seen.add((meta["set"], meta["youtube_id"]))
    assert seen == {(s, ytid) for s, rows in expected.items() for ytid in rows}
    shared = eval_collection["rows"]["shared"].youtube_id  # in both sets, each copy with its csv's labels
    assert expected["balanced_train"][shared] != expected["eval"][shared]


def test_the_catalog_of_each_set_holds_its_csvs_label_lists(
    sharded_both: Path, collection: dict, eval_collection: dict, real: dict
) -> None:
    expected = expected_by_set(collection, eval_collection, real)
    for set_name, by_id in expected.items():
        catalog = read_catalog(find_shards(sharded_both, set_name))
        video_ids = {}
        for sample in samples_of(sharded_both):
            meta = json.loads(sample["json"])
            if meta["set"] == set_name:
                video_ids[fmt.decode_info(sample["info.npy"])["video"]] = meta["youtube_id"]
        assert catalog.multi_label and catalog.videos.tolist() == sorted(video_ids) == list(range(len(by_id)))
        labels = [catalog.label_set(r).tolist() for r in range(catalog.num_videos)]
        assert labels == [by_id[video_ids[int(v)]] for v in catalog.videos]


def test_each_set_is_byte_identical_to_its_csv_sharded_alone(
    sharded: Path, sharded_eval: Path, sharded_both: Path
) -> None:
    """A set's shards depend on its jobs, the seed and its name (the shuffle) and the encode only: every file
    of each set folder (tars, DALI indexes, unit markers) and its dataset.json entry equal those of the run
    with its csv alone. The folder-wide files differ (params.json: the plan hash covers both sets); the
    errors are the two runs' lines, set by set. (Not so for a `Y<id>` file of a video that the csvs list
    at two spans: matched by one csv alone, by neither together; see the next test.)"""
    both = json.loads((sharded_both / "dataset.json").read_text())
    for alone, set_name in ((sharded, "balanced_train"), (sharded_eval, "eval")):
        names = sorted(p.name for p in (alone / set_name).iterdir())
        assert names == sorted(p.name for p in (sharded_both / set_name).iterdir())
        assert sum(n.endswith(".tar") for n in names) >= 1 and sum(n.endswith(".idx") for n in names) >= 1
        same = [
            (sharded_both / set_name / n).read_bytes() == (alone / set_name / n).read_bytes() for n in names
        ]
        assert [n for n, equal in zip(names, same, strict=True) if not equal] == []
        assert both["sets"][set_name] == json.loads((alone / "dataset.json").read_text())["sets"][set_name]
    errors = [(out / "errors.jsonl").read_text() for out in (sharded, sharded_eval, sharded_both)]
    assert errors[2] == errors[0] + errors[1]


def test_y_names_match_a_segment_both_csvs_list_but_not_a_video_at_two_spans(
    tmp_path: Path, shared_dir: Path, real: dict, real_eval: dict, audioset: Path
) -> None:
    """`Y<id>` says nothing of the span: a segment listed in both csvs (with other labels) is matched in both
    sets, each job with its csv's labels; a video the csvs list at two spans is matched in neither (the
    balanced csv alone matches it)."""
    rows = pick(real)
    one, two = rows["kinetics_style"], rows["missing"]
    wav = shared_dir / "data" / "fsdd" / "recordings" / "0_george_0.wav"
    for row in (one, two):
        link(wav, tmp_path / "wav" / f"Y{row.youtube_id}.wav")
    later = f'{two.youtube_id}, {two.end:.3f}, {two.end + 10:.3f}, "{",".join(two.mids)}"'
    eval_mids = real_eval["rows"][0].mids
    train = write_csv(tmp_path / "meta" / "balanced_train_segments.csv", real, [one, two])
    evals = [relabelled(one, eval_mids), dataclasses.replace(two, line=later)]
    eval_csv = write_csv(tmp_path / "meta" / "eval_segments.csv", real_eval, evals)
    link(audioset / "class_labels_indices.csv", tmp_path / "meta" / "class_labels_indices.csv")
    plan = build_plan(tmp_path / "wav", csv=[train, eval_csv])
    assert list(plan.sets) == ["balanced_train", "eval"] and plan.multi_label
    (a,), (b,) = plan.sets.values()
    assert a.name == b.name == f"Y{one.youtube_id}.wav" and a.set_name != b.set_name
    assert list(a.class_indices) == expected_indices(one, real)
    assert list(b.class_indices) == sorted({real["index"][mid] for mid in eval_mids}) != list(a.class_indices)
    assert sorted((m["set"], m["path"].partition("#")[0]) for m in plan.missing) == [
        ("balanced_train", two.youtube_id),
        ("eval", two.youtube_id),
    ]
    alone = build_plan(tmp_path / "wav", csv=train)
    assert sorted(j.name for j in alone.sets["balanced_train"]) == sorted(
        f"Y{r.youtube_id}.wav" for r in (one, two)
    )
    assert plan_fingerprint(build_plan(tmp_path / "wav", csv=[train])) == plan_fingerprint(alone)


def test_errors_of_several_csvs_are_one_line_naming_the_files(
    collection: dict, eval_collection: dict, real_eval: dict, audioset: Path, splits_dir: Path, tmp_path: Path
) -> None:
    root, train, evals = collection["root"], collection["csv"], eval_collection["csv"]
    on_disk = eval_collection["rows"]["on_disk"]

    def fails(*args: Path | str) -> str:
        result = CliRunner().invoke(shard, [str(root), *map(str, args), "-o", str(tmp_path / "out")])
        assert result.exit_code in (InputError.exit_code, ConfigError.exit_code), result.output
        assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
        assert not (tmp_path / "out").exists()
        return result.output

    index = audioset / "class_labels_indices.csv"
    other = write_csv(tmp_path / "other" / "eval_segments.csv", real_eval, [on_disk])
    (tmp_path / "other" / "class_labels_indices.csv").write_text(
        "\n".join(index.read_text().splitlines()[:-1]) + "\n"  # the last class left out
    )
    message = fails("--csv", train, "--csv", other)
    assert (
        f"{tmp_path}/other/class_labels_indices.csv: differs from {train.parent}/class_labels_indices.csv"
        in message
    )
    plan = build_plan(root, csv=[train, other], classes=index)  # --classes settles which one
    assert list(plan.sets) == ["balanced_train", "eval"] and len(plan.classes) == NUM_CLASSES
    (tmp_path / "other" / "class_labels_indices.csv").write_bytes(index.read_bytes().replace(b"\n", b"\r\n"))
    assert list(build_plan(root, csv=[train, other]).sets) == ["balanced_train", "eval"]  # same classes

    message = fails("--csv", evals, "--csv", other)
    assert f"Error: {other}: its set 'eval' is also {evals}'s (with several csvs" in message
    message = fails("--csv", train, "--csv", evals, "--set-name", "mine")
    assert "--set-name 'mine' with 2 csvs: each csv names its own set" in message
    kinetics = splits_dir / "kinetics400" / "kinetics-400_val.csv"
    message = fails("--csv", train, "--csv", kinetics)
    assert f"Error: {kinetics}: a Kinetics csv, but {train} is an AudioSet segments csv" in message
