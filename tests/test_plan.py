"""Input planning: real split files and media from ../shared/data, plus layouts built in tmp_path."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from xdctools.errors import ConfigError, InputError
from xdctools.shard import annotations as ann
from xdctools.shard.plan import build_plan, detect_kind, shuffle_plan
from xdctools.shard.run import plan_fingerprint

UCF_OFFICIAL = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}  # (train, test) videos per split


@pytest.fixture(scope="module")
def ucf_lists(splits_dir: Path) -> Path:
    return splits_dir / "ucf101" / "ucfTrainTestlist"


@pytest.fixture(scope="module")
def hmdb_dir(splits_dir: Path) -> Path:
    return splits_dir / "hmdb51" / "testTrainMulti_7030_splits"


@pytest.fixture(scope="module")
def kinetics_val(splits_dir: Path) -> Path:
    return splits_dir / "kinetics400" / "kinetics-400_val.csv"


def link(target: Path, path: Path) -> Path:
    """A real media file placed in a layout built by the test (a link, nothing copied)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def ucf_class_numbers(ucf_lists: Path) -> dict[str, int]:
    lines = (ucf_lists / "classInd.txt").read_text().split("\n")
    return {name: int(number) for number, name in (line.split() for line in lines if line.strip())}


# --- UCF101 ----------------------------------------------------------------------------------------
def test_ucf101_lists_give_the_official_split_sizes(ucf_lists: Path) -> None:
    numbers = ucf_class_numbers(ucf_lists)
    classes = ann.parse_class_index((ucf_lists / "classInd.txt").read_text(), "classInd.txt")
    assert len(classes) == 101 and classes[0] == "ApplyEyeMakeup" and classes[100] == "YoYo"
    all_videos = None
    for split, (n_train, n_test) in UCF_OFFICIAL.items():
        sets = {}
        for subset in ("train", "test"):
            path = ucf_lists / f"{subset}list{split:02d}.txt"
            assert ann.ucf101_list_name(path.name) == (subset, split)
            records = ann.parse_ucf101_list(path.read_text(), str(path), classes, split, subset)
            assert all(r.set_name == f"split{split}-{subset}" for r in records)
            assert all(r.class_index == numbers[r.label] - 1 for r in records)  # classInd is 1-based
            assert {r.label for r in records} == set(classes)
            sets[subset] = {r.path for r in records}
        assert (len(sets["train"]), len(sets["test"])) == (n_train, n_test)
        assert not sets["train"] & sets["test"]
        videos = sets["train"] | sets["test"]
        assert len(videos) == 13320
        assert all_videos is None or videos == all_videos  # every split partitions the same videos
        all_videos = videos


def test_ucf101_split_dir_matches_the_clips_present(
    media_dir: Path, splits_dir: Path, ucf_lists: Path
) -> None:
    root = media_dir / "UCF-101"
    plan = build_plan(root, splits=splits_dir / "ucf101")  # the lists sit one folder down
    assert plan.kind == "ucf101" and not plan.audio_required
    assert len(plan.classes) == 101
    assert list(plan.sets) == ["split1-train"]
    jobs = plan.sets["split1-train"]
    assert [j.name for j in jobs] == [
        "SoccerJuggling/v_SoccerJuggling_g23_c01.avi",
        "SoccerJuggling/v_SoccerJuggling_g24_c01.avi",
    ]
    assert [j.index for j in jobs] == [0, 1]
    soccer = ucf_class_numbers(ucf_lists)["SoccerJuggling"] - 1
    for job in jobs:
        assert job.label == "SoccerJuggling" and job.class_index == soccer
        assert plan.classes[job.class_index] == "SoccerJuggling"
        assert Path(job.path) == root / job.name and job.start is None and not job.audio_only
        assert job.extra == (("split", 1), ("subset", "train"))
    assert len(plan.missing) == 9537 + 3783 - 2
    assert Counter(m["set"] for m in plan.missing) == {"split1-train": 9535, "split1-test": 3783}
    assert {m["reason"] for m in plan.missing} == {"missing_file"}

    every = build_plan(root, kind="ucf101", splits=ucf_lists, split_ids="all")
    assert list(every.sets) == ["split1-train", "split2-train", "split3-train"]
    assert len(every.missing) == sum(a + b for a, b in UCF_OFFICIAL.values()) - 6


def test_ucf101_bad_split_line_names_file_and_line(tmp_path: Path, media_dir: Path, ucf_lists: Path) -> None:
    (tmp_path / "classInd.txt").write_bytes((ucf_lists / "classInd.txt").read_bytes())
    good = "SoccerJuggling/v_SoccerJuggling_g23_c01.avi 84\r\n"
    (tmp_path / "trainlist01.txt").write_text(good + "SoccerJuggling/v_SoccerJuggling_g24_c01.avi one\r\n")
    (tmp_path / "testlist01.txt").write_text("SoccerJuggling/v_SoccerJuggling_g01_c01.avi\r\n")
    with pytest.raises(InputError, match=r"trainlist01\.txt:2: malformed line"):
        build_plan(media_dir / "UCF-101", splits=tmp_path)
    (tmp_path / "trainlist01.txt").write_text(good + "NoSuchClass/v_x.avi 3\r\n")
    with pytest.raises(
        InputError, match=r"trainlist01\.txt:2: class 'NoSuchClass' is not in the class index"
    ):
        build_plan(media_dir / "UCF-101", splits=tmp_path)
    (tmp_path / "trainlist01.txt").write_text("SoccerJuggling/v_SoccerJuggling_g23_c01.avi 5\r\n")
    with pytest.raises(InputError, match=r"trainlist01\.txt:1: label 5 disagrees"):
        build_plan(media_dir / "UCF-101", splits=tmp_path)
    with pytest.raises(InputError, match=r"split 2 not found \(available: 1\)"):
        build_plan(media_dir / "UCF-101", splits=tmp_path, split_ids=[2])


# --- HMDB51 ----------------------------------------------------------------------------------------
def test_hmdb51_split_files_are_70_train_30_test_per_class(hmdb_dir: Path) -> None:
    per_class: dict[tuple[str, int], Counter] = {}
    for path in sorted(hmdb_dir.iterdir()):
        label, split = ann.hmdb51_split_name(path.name)
        records = ann.parse_hmdb51_split(path.read_text(), str(path), label, split)
        assert all(r.path.startswith(f"{label}/") and r.path.endswith(".avi") for r in records)
        per_class[(label, split)] = Counter(r.set_name for r in records)
    assert len({label for label, _ in per_class}) == 51
    assert {split for _, split in per_class} == {1, 2, 3}
    for (_, split), counts in per_class.items():
        assert counts == {f"split{split}-train": 70, f"split{split}-test": 30}


def test_hmdb51_splits_match_the_clips_present(media_dir: Path, hmdb_dir: Path) -> None:
    # What the split files say about the four clips in media/hmdb51, read here independently.
    codes = {}
    for path in hmdb_dir.glob("*_test_split*.txt"):
        label, split = ann.hmdb51_split_name(path.name)
        for line in path.read_text().splitlines():
            video, code = line.split()
            if (media_dir / "hmdb51" / label / video).exists():
                codes[(f"{label}/{video}", split)] = code
    assert len(codes) == 4 * 3
    plan = build_plan(media_dir / "hmdb51", splits=hmdb_dir.parent, split_ids="all")
    assert plan.kind == "hmdb51" and not plan.audio_required
    assert len(plan.classes) == 51 and plan.classes == sorted(plan.classes)
    for split in (1, 2, 3):
        for subset, code in (("train", "1"), ("test", "2")):
            expected = sorted(name for (name, s), c in codes.items() if s == split and c == code)
            jobs = plan.sets.get(f"split{split}-{subset}", [])
            assert [j.name for j in jobs] == expected
            for job in jobs:
                assert plan.classes[job.class_index] == job.label == job.name.split("/")[0]
                assert job.extra == (("split", split), ("subset", subset))
    assert len(plan.missing) == 3 * 51 * 100 - sum(
        c != "0" for c in codes.values()
    )  # "0": unused, not missing


def test_hmdb51_malformed_line(tmp_path: Path, media_dir: Path) -> None:
    (tmp_path / "wave_test_split1.txt").write_text("RATRACE_wave_f_nm_np1_fr_goo_37.avi 1 \nbroken.avi 7 \n")
    with pytest.raises(InputError, match=r"wave_test_split1\.txt:2: malformed line"):
        build_plan(media_dir / "hmdb51", splits=tmp_path)


# --- ESC-50 ----------------------------------------------------------------------------------------
def test_esc50_five_folds_of_400(tmp_path: Path, splits_dir: Path, shared_dir: Path) -> None:
    meta = splits_dir / "esc50" / "meta" / "esc50.csv"
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    wav = next((shared_dir / "data" / "fsdd" / "recordings").glob("*.wav"))
    for row in rows:  # the audio is not in shared/data: real wav files under ESC-50's names
        link(wav, tmp_path / "ESC-50" / "audio" / row["filename"])
    plan = build_plan(tmp_path / "ESC-50", splits=splits_dir / "esc50")
    assert plan.kind == "esc50" and plan.audio_required and not plan.missing
    assert list(plan.sets) == [f"fold{i}" for i in range(1, 6)]
    assert [len(jobs) for jobs in plan.sets.values()] == [400] * 5
    assert len(plan.classes) == 50
    by_name = {row["filename"]: row for row in rows}
    for fold, jobs in plan.sets.items():
        for job in jobs:
            row = by_name[job.name]
            assert fold == f"fold{row['fold']}" and job.extra == (("fold", int(row["fold"])),)
            assert job.class_index == int(row["target"]) and job.label == row["category"]
            assert plan.classes[job.class_index] == job.label and job.audio_only

    subset = build_plan(tmp_path / "ESC-50", kind="esc50", splits=meta, split_ids=[2, 5])
    assert list(subset.sets) == ["fold2", "fold5"]


# --- Kinetics csv ----------------------------------------------------------------------------------
def test_kinetics_val_csv_matches_trimmed_clips(media_dir: Path, kinetics_val: Path) -> None:
    with kinetics_val.open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({row["label"] for row in rows})
    plan = build_plan(media_dir / "kinetics", csv=kinetics_val)
    assert plan.kind == "kinetics-csv" and plan.audio_required
    assert plan.classes == labels and len(labels) == 400
    assert list(plan.sets) == ["val"]
    jobs = plan.sets["val"]
    segway = [r for r in rows if r["label"] == "using segway"]
    on_disk = {p.stem for p in (media_dir / "kinetics" / "using segway").glob("*.mp4")}
    expected = sorted(
        f"using segway/{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}.mp4"
        for r in segway
        if f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}" in on_disk
    )
    assert len(expected) == 3 and [j.name for j in jobs] == expected
    for job in jobs:
        assert job.label == "using segway" and job.class_index == labels.index("using segway")
        assert job.start is None and job.end is None  # already trimmed
        assert job.extra == (("youtube_id", Path(job.name).stem[:11]),)
    assert len(plan.missing) == len(rows) - 3
    assert {m["set"] for m in plan.missing} == {"val"}


def test_kinetics_full_videos_are_trimmed_and_test_rows_unlabelled(
    tmp_path: Path, media_dir: Path, splits_dir: Path
) -> None:
    clip = media_dir / "kinetics" / "using segway" / "R6llTwEh07w_000000_000010.mp4"
    test_csv = splits_dir / "kinetics400" / "kinetics-400_test.csv"
    with test_csv.open(newline="") as f:
        first = next(csv.DictReader(f))
    link(clip, tmp_path / "raw" / f"{first['youtube_id']}.mp4")  # a full (untrimmed) download
    plan = build_plan(tmp_path / "raw", kind="kinetics-csv", csv=test_csv)
    assert plan.classes == []
    (job,) = plan.sets["test"]
    assert job.label is None and job.class_index == -1
    assert (job.start, job.end) == (float(first["time_start"]), float(first["time_end"]))
    assert job.name == f"{first['youtube_id']}.mp4#t={first['time_start']},{first['time_end']}"
    assert job.path == str(tmp_path / "raw" / f"{first['youtube_id']}.mp4")


def test_kinetics_val_and_test_csvs_in_one_plan(
    tmp_path: Path, media_dir: Path, splits_dir: Path, kinetics_val: Path
) -> None:
    """Several Kinetics csvs: each row in the set its split column names, every set from one csv, the classes
    those of all the csvs; each set's jobs as planned from its csv alone."""
    test_csv = splits_dir / "kinetics400" / "kinetics-400_test.csv"
    with test_csv.open(newline="") as f:
        first = next(csv.DictReader(f))
    root = tmp_path / "downloads"
    link(media_dir / "kinetics" / "using segway", root / "using segway")  # trimmed val clips
    link(
        media_dir / "kinetics" / "using segway" / "R6llTwEh07w_000000_000010.mp4",
        root / f"{first['youtube_id']}.mp4",
    )
    val, test = build_plan(root, csv=kinetics_val), build_plan(root, csv=test_csv)
    both = build_plan(root, csv=[kinetics_val, test_csv])
    assert both.kind == "kinetics-csv" and list(both.sets) == ["test", "val"]
    assert both.classes == val.classes and len(both.classes) == 400  # the test csv has no labels
    assert (
        both.sets == {**val.sets, **test.sets} and len(both.sets["val"]) == 3 and len(both.sets["test"]) == 1
    )
    assert both.missing == sorted(val.missing + test.missing, key=lambda m: (m["set"], m["path"]))

    again = tmp_path / "val-copy.csv"
    again.write_bytes(kinetics_val.read_bytes())
    with pytest.raises(
        InputError, match=rf"val-copy\.csv: its set 'val' is also {kinetics_val}'s \(with several"
    ):
        build_plan(root, csv=[kinetics_val, again])
    with pytest.raises(ConfigError, match=r"--set-name 'x' with 2 csvs: each csv names its own set"):
        build_plan(root, csv=[kinetics_val, test_csv], set_name="x")


def test_kinetics_csv_without_youtube_id_column(tmp_path: Path, media_dir: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("label,video,time_start,time_end,split\nusing segway,R6llTwEh07w,0,10,val\n")
    with pytest.raises(InputError, match=r"bad\.csv: csv lacks required column\(s\) youtube_id"):
        build_plan(media_dir / "kinetics", csv=bad)


# --- class trees and folders -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("folder", "classes"),
    [
        ("kinetics", ["arm wrestling", "flipping pancake", "using segway"]),
        ("hmdb51", ["cartwheel", "wave"]),
        ("UCF-101", ["SoccerJuggling"]),
    ],
)
def test_class_tree_labels_are_folder_names(media_dir: Path, folder: str, classes: list[str]) -> None:
    root = media_dir / folder
    plan = build_plan(root)
    assert plan.kind == "class-tree" and plan.audio_required and not plan.missing
    assert plan.classes == classes
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    (jobs,) = plan.sets.values()
    assert list(plan.sets) == ["train"]
    assert [j.name for j in jobs] == on_disk and [j.index for j in jobs] == list(range(len(on_disk)))
    for job in jobs:
        assert job.label == job.name.split("/")[0] and plan.classes[job.class_index] == job.label
        assert Path(job.path) == root / job.name
    assert build_plan(root) == plan  # deterministic


def test_same_file_name_in_two_classes(tmp_path: Path, media_dir: Path) -> None:
    clip = media_dir / "hmdb51" / "wave" / "RATRACE_wave_f_nm_np1_fr_goo_37.avi"
    for label in ("b class", "a class"):
        link(clip, tmp_path / label / "clip.avi")
    (tmp_path / "a class" / ".hidden.avi").write_bytes(b"")  # hidden: ignored
    (tmp_path / "notes.txt").write_text("not media")  # not media: ignored
    plan = build_plan(tmp_path, set_name="pretrain")
    jobs = plan.sets["pretrain"]
    assert [(j.index, j.name, j.label, j.class_index) for j in jobs] == [
        (0, "a class/clip.avi", "a class", 0),
        (1, "b class/clip.avi", "b class", 1),
    ]
    assert len({j.path for j in jobs}) == 2


def test_class_index_file_fixes_indices(tmp_path: Path, media_dir: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("using segway\nflipping pancake\narm wrestling\nextra class\n")
    plan = build_plan(media_dir / "kinetics", classes=names)
    assert plan.classes == ["using segway", "flipping pancake", "arm wrestling", "extra class"]
    assert {j.label: j.class_index for j in plan.sets["train"]} == {
        "using segway": 0,
        "flipping pancake": 1,
        "arm wrestling": 2,
    }
    names.write_text("using segway\n")
    with pytest.raises(InputError, match=r"arm wrestling: class 'arm wrestling' is not in .*names\.txt"):
        build_plan(media_dir / "kinetics", classes=names)


def test_class_ind_in_root_is_used(tmp_path: Path, media_dir: Path) -> None:
    clip = media_dir / "UCF-101" / "SoccerJuggling" / "v_SoccerJuggling_g23_c01.avi"
    link(clip, tmp_path / "Zebra" / "a.avi")
    link(clip, tmp_path / "Apple" / "b.avi")
    (tmp_path / "classInd.txt").write_bytes(b"2 Apple\r\n1 Zebra\r\n")
    plan = build_plan(tmp_path)
    assert plan.classes == ["Zebra", "Apple"]
    assert [(j.label, j.class_index) for j in plan.sets["train"]] == [("Apple", 1), ("Zebra", 0)]


def test_flat_folder_is_unlabelled(tmp_path: Path, media_dir: Path) -> None:
    for clip in sorted((media_dir / "kinetics" / "using segway").glob("*.mp4"))[:2]:
        link(clip, tmp_path / clip.name.upper())  # upper-case suffix still counts
    plan = build_plan(tmp_path)
    assert plan.kind == "folder" and plan.classes == [] and plan.audio_required
    assert [(j.label, j.class_index) for j in plan.sets["train"]] == [(None, -1), (None, -1)]


def test_loose_files_beside_class_folders(tmp_path: Path, media_dir: Path) -> None:
    clip = media_dir / "UCF-101" / "SoccerJuggling" / "v_SoccerJuggling_g23_c01.avi"
    link(clip, tmp_path / "cls" / "a.avi")
    link(clip, tmp_path / "loose.avi")
    with pytest.raises(InputError, match=r"sit beside the class folders \(e\.g\. 'loose\.avi'\)"):
        build_plan(tmp_path)
    assert build_plan(tmp_path, kind="folder").kind == "folder"  # explicitly unlabelled: all files


def test_audio_folders(tmp_path: Path, shared_dir: Path) -> None:
    recordings = shared_dir / "data" / "fsdd" / "recordings"
    wavs = [recordings / f"{digit}_george_{i}.wav" for digit in (0, 1) for i in (0, 1)]
    for wav in wavs:
        link(wav, tmp_path / "digits" / wav.name[0] / wav.name)
        link(wav, tmp_path / "flat" / wav.name)
    labelled = build_plan(tmp_path / "digits")
    assert labelled.kind == "audio" and labelled.classes == ["0", "1"] and labelled.audio_required
    assert all(j.audio_only and j.label == j.name[0] for j in labelled.sets["train"])
    flat = build_plan(tmp_path / "flat")
    assert flat.kind == "audio" and flat.classes == []
    assert all(j.audio_only and j.label is None for j in flat.sets["train"])


# --- manifests -------------------------------------------------------------------------------------
def test_manifest_csv_and_jsonl(tmp_path: Path, media_dir: Path) -> None:
    segway = sorted((media_dir / "kinetics" / "using segway").glob("*.mp4"))
    link(segway[0], tmp_path / "clips" / "a.mp4")
    link(segway[1], tmp_path / "clips" / "b.mp4")
    rows = [
        {"path": "clips/b.mp4", "label": "ride", "start": "1.5", "end": "4", "set": "val"},
        {"path": "clips/a.mp4", "label": "walk", "start": "", "end": "", "set": ""},
        {"path": str(segway[2]), "label": "ride", "start": "", "end": "", "set": ""},  # absolute
        {"path": "clips/gone.mp4", "label": "walk", "start": "", "end": "", "set": ""},
    ]
    with (tmp_path / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (tmp_path / "m.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if v != ""}) + "\n")
    plans = [build_plan(tmp_path, manifest=tmp_path / "m.csv"), build_plan(tmp_path / "m.jsonl")]
    for plan in plans:
        assert plan.kind == "manifest" and plan.classes == ["ride", "walk"] and plan.audio_required
        assert list(plan.sets) == ["train", "val"]
        (val,) = plan.sets["val"]
        assert (val.name, val.label, val.class_index, val.start, val.end) == (
            "clips/b.mp4#t=1.5,4",
            "ride",
            0,
            1.5,
            4,
        )
        assert val.path == str(tmp_path / "clips" / "b.mp4")
        train = plan.sets["train"]
        assert [(j.name, j.label, j.class_index) for j in train] == sorted(
            [("clips/a.mp4", "walk", 1), (segway[2].as_posix(), "ride", 0)]
        )
        assert all(j.start is None and j.end is None for j in train)
    for plan, source in zip(plans, (f"{tmp_path / 'm.csv'}:5", f"{tmp_path / 'm.jsonl'}:4"), strict=True):
        gone = {"path": "clips/gone.mp4", "reason": "missing_file", "set": "train", "source": source}
        assert plan.missing == [gone]  # the row that names it, to find it by
    assert plans[0].sets == plans[1].sets


def test_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,label\na.mp4,x\n")
    with pytest.raises(InputError, match=r"m\.csv: csv lacks required column\(s\) path"):
        build_plan(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4"}\n{"path": "b.mp4", "start": 5, "end": 2}\n')
    with pytest.raises(InputError, match=r"m\.jsonl:2: end 2 is not after start 5"):
        build_plan(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(InputError, match=r"m\.jsonl: none of its 1 listed files were found"):
        build_plan(tmp_path / "m.jsonl")


# --- bad roots and detection -----------------------------------------------------------------------
def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere: no such folder"):
        build_plan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no video or audio files found"):
        build_plan(tmp_path / "empty")
    with pytest.raises(InputError, match=r"empty: no video files found"):
        build_plan(tmp_path / "empty", kind="class-tree")
    with pytest.raises(ConfigError, match="unknown input kind"):
        build_plan(tmp_path / "empty", kind="youtube")
    with pytest.raises(ConfigError, match="needs a Kinetics csv"):
        build_plan(tmp_path / "empty", kind="kinetics-csv")


def test_detect_kind_from_split_files(splits_dir: Path, media_dir: Path) -> None:
    assert detect_kind(media_dir, splits=splits_dir / "ucf101") == "ucf101"
    assert detect_kind(media_dir, splits=splits_dir / "hmdb51") == "hmdb51"
    assert detect_kind(media_dir, splits=splits_dir / "esc50") == "esc50"
    assert detect_kind(media_dir, csv=splits_dir / "kinetics400" / "kinetics-400_val.csv") == "kinetics-csv"
    assert detect_kind(media_dir / "kinetics") == "class-tree"
    with pytest.raises(InputError, match=r"kinetics400: not UCF101 lists"):
        detect_kind(media_dir, splits=splits_dir / "kinetics400")


def test_class_index_parser() -> None:
    assert ann.parse_class_index("0 b\n1 a\n", "c.txt") == ["b", "a"]
    assert ann.parse_class_index("a b\nc\n", "c.txt") == ["a b", "c"]
    with pytest.raises(InputError, match=r"c\.txt:2: class number 3, expected 2"):
        ann.parse_class_index("1 a\n3 b\n", "c.txt")
    with pytest.raises(InputError, match=r"c\.txt:2: class 'a' listed twice"):
        ann.parse_class_index("a\na\n", "c.txt")


def test_shuffled_order_mixes_the_classes(tmp_path: Path, media_dir: Path) -> None:
    """Name order is class order; the seeded shuffle spreads every class over the whole set."""
    clip = media_dir / "hmdb51" / "wave" / "RATRACE_wave_f_nm_np1_fr_goo_37.avi"
    for digit in range(10):
        for n in range(12):
            link(clip, tmp_path / "digits" / str(digit) / f"{digit}_{n:02d}.avi")
    by_name = build_plan(tmp_path / "digits")
    shuffled = shuffle_plan(by_name, 0)
    (named,), (mixed,) = by_name.sets.values(), shuffled.sets.values()
    assert by_name.shuffle_seed is None and shuffled.shuffle_seed == 0
    assert sorted(j.name for j in mixed) == [j.name for j in named]
    assert [j.index for j in mixed] == list(range(120))
    quarter = [{j.class_index for j in jobs[:30]} for jobs in (named, mixed)]
    assert len(quarter[0]) == 3 and len(quarter[1]) >= 8  # 30 neighbours: 3 classes vs nearly all
    assert shuffle_plan(build_plan(tmp_path / "digits"), 0) == shuffled  # a rerun or another node agrees
    other = shuffle_plan(by_name, 1)
    assert [j.name for j in other.sets["train"]] != [j.name for j in mixed]
    assert len({plan_fingerprint(p) for p in (by_name, shuffled, other)}) == 3  # no resume across orders
    with pytest.raises(ConfigError, match="already shuffled"):
        shuffle_plan(shuffled, 0)
