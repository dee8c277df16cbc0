"""AudioSet's csvs through the pure parsers: the real files in ../shared/data/splits/audioset, and one-line
errors on lines cut from them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from xdctools.errors import InputError
from xdctools.shard import annotations as ann


@pytest.fixture(scope="module")
def audioset(splits_dir: Path) -> Path:
    return splits_dir / "audioset"


def header_counts(text: str) -> dict[str, int]:
    """The official second comment line: `# num_ytids=22160, num_segs=22160, ...` as numbers."""
    line = text.splitlines()[1].lstrip("# ")
    return {key: int(value) for key, value in (item.split("=") for item in line.split(", "))}


@pytest.mark.parametrize(
    ("name", "set_name"), [("balanced_train_segments.csv", "balanced_train"), ("eval_segments.csv", "eval")]
)
def test_real_segment_csvs_match_their_own_counts(audioset: Path, name: str, set_name: str) -> None:
    path = audioset / name
    text = path.read_text()
    rows = ann.parse_audioset_csv(text, str(path))
    counts = header_counts(text)
    assert len(rows) == counts["num_segs"] == len({r.youtube_id for r in rows}) == counts["num_ytids"]
    assert len({mid for r in rows for mid in r.mids}) == counts["num_unique_labels"] == 527
    assert sum(len(r.mids) for r in rows) == counts["num_positive_labels"]
    assert rows[0].line == 4  # three comment lines first
    assert ann.is_audioset_csv(text[:4096]) and ann.audioset_set_name(name) == set_name
    # the first data line, read by the standard csv module: same id, span and label list
    first = next(csv.reader([text.splitlines()[3]], skipinitialspace=True))
    assert (rows[0].youtube_id, rows[0].start, rows[0].end) == (first[0], float(first[1]), float(first[2]))
    assert rows[0].mids == tuple(first[3].split(","))


def test_real_class_index(audioset: Path, splits_dir: Path) -> None:
    path = audioset / "class_labels_indices.csv"
    classes = ann.parse_audioset_classes(path.read_text(), str(path))
    with path.open(newline="") as f:
        expected = [(int(r["index"]), r["mid"], r["display_name"]) for r in csv.DictReader(f)]
    assert [(c.index, c.mid, c.name) for c in classes] == expected
    assert len(classes) == 527 and (classes[0].mid, classes[0].name) == ("/m/09x0r", "Speech")
    assert classes[1].name == "Male speech, man speaking"  # a quoted name with a comma
    kinetics = splits_dir / "kinetics400" / "kinetics-400_val.csv"
    assert not ann.is_audioset_csv(kinetics.read_text()[:4096])


def test_set_names() -> None:
    assert ann.audioset_set_name("unbalanced_train_segments.csv") == "unbalanced_train"
    assert ann.audioset_set_name("/data/as/eval_segments.csv") == "eval"
    assert ann.audioset_set_name("my_subset.csv") == "my_subset"
    assert ann.audioset_set_name("_segments.csv") == "_segments"


def test_clip_stems_of_fractional_and_integer_spans() -> None:
    row = ann.AudioSetRow("AE5oZzfu2-E", 239.8, 249.8, ("/m/0326g",), 5)
    assert row.clip_stems == ("AE5oZzfu2-E_239800_249800",)  # milliseconds only: no Kinetics stem
    row = ann.AudioSetRow("--PJHxphWEs", 30.0, 40.0, ("/m/09x0r",), 4)
    assert row.clip_stems == ("--PJHxphWEs_000030_000040", "--PJHxphWEs_30000_40000")


def test_plain_header_and_headerless_csvs() -> None:
    text = 'YTID,start_seconds,end_seconds,positive_labels\n\n--PJHxphWEs,30,40,"/m/09x0r,/t/dd00088"\n'
    assert ann.is_audioset_csv(text)
    (row,) = ann.parse_audioset_csv(text, "x.csv")
    assert row.mids == ("/m/09x0r", "/t/dd00088") and row.line == 3
    headerless = text.split("\n", 2)[2]  # rows only, as a filtered copy may be written
    assert ann.is_audioset_csv(headerless) and ann.parse_audioset_csv(headerless, "x.csv") == [
        ann.AudioSetRow("--PJHxphWEs", 30.0, 40.0, ("/m/09x0r", "/t/dd00088"), 1)
    ]
    assert not ann.is_audioset_csv("label,youtube_id,time_start,time_end,split\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('--PJHxphWEs, 30.000, "/m/09x0r"', r"x\.csv:4: malformed row '--PJHxphWEs, 30\.000, \"/m/09x0r\"'"),
        ('--PJHxphWEs, 30.000, 40.000, ""', r"x\.csv:4: empty label list"),
        ("--PJHxphWEs, 30.000, 40.000,", r"x\.csv:4: empty label list"),
        ('--PJHxphWEs, 30.000, 40.000, "/m/09x0r,,/m/0"', r"x\.csv:4: empty class id in the label list"),
        (
            '--PJHxphWEs, thirty, 40.000, "/m/09x0r"',
            r"x\.csv:4: start_seconds must be a number, got 'thirty'",
        ),
        ('--PJHxphWEs, 40.000, 30.000, "/m/09x0r"', r"x\.csv:4: end 30 is not after start 40"),
    ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_line(line: str, message: str) -> None:
    comments = "# Segments csv\n# num_ytids=1\n# YTID, start_seconds, end_seconds, positive_labels\n"
    with pytest.raises(InputError, match=message) as info:
        ann.parse_audioset_csv(comments + line + "\n", "x.csv")
    assert "\n" not in str(info.value)


def test_unknown_class_id_names_both_files() -> None:
    row = ann.AudioSetRow("--PJHxphWEs", 30.0, 40.0, ("/m/09x0r", "/m/xyz"), 4)
    with pytest.raises(InputError, match=r"^seg\.csv:4: class id '/m/xyz' is not in cls\.csv$"):
        ann.audioset_class_indices(row, {"/m/09x0r": 0}, "seg.csv", "cls.csv")
    row = ann.AudioSetRow("--PJHxphWEs", 30.0, 40.0, ("/m/b", "/m/a", "/m/b"), 4)
    assert ann.audioset_class_indices(row, {"/m/a": 7, "/m/b": 2}, "seg.csv", "cls.csv") == (2, 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1 ApplyEyeMakeup\n2 ApplyLipstick\n",
            r"c\.csv: not an AudioSet class index: header '1 ApplyEyeMakeup'",
        ),
        ("mid,index,display_name\n/m/a,0,A\n", r"c\.csv: not an AudioSet class index"),
        ("", r"c\.csv: not an AudioSet class index"),
        ("index,mid,display_name\n", r"c\.csv: no classes"),
        ("index,mid,display_name\n0,/m/a,A\nx,/m/b,B\n", r"c\.csv:3: malformed row"),
        ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", r"c\.csv:3: class id '/m/a' listed twice"),
        ("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n", r"c\.csv: indices are not 0\.\.1 \(no index 1\)"),
    ],
)
def test_bad_class_index_is_a_one_line_error(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ann.parse_audioset_classes(text, "c.csv")
