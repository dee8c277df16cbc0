"""Pure parsers of dataset annotations (class indices, split lists, csv and jsonl manifests): text -> records.

Nothing here touches the disk: each parser takes the file's text and its path (`source`, used only in
messages) and raises `InputError` naming `source` and the line when the text is malformed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from xdctools.errors import InputError

Extra = tuple[tuple[str, str | int], ...]


@dataclass(frozen=True)
class Record:
    """One annotated media file, before it is looked up on disk."""

    path: str  # as annotated: "ApplyEyeMakeup/v_x.avi", "1-100032-A-0.wav", "clips/a.mp4", "/abs/a.mp4"
    set_name: str
    label: str | None = None
    class_index: int | None = None  # 0-based index stated by the annotation itself (UCF101, ESC-50)
    start: float | None = None  # seconds; trim to [start, end] when given
    end: float | None = None
    extra: Extra = ()
    line: int = 0  # 1-based line in the source, for messages


@dataclass(frozen=True)
class KineticsRow:
    """One row of a Kinetics csv (`label,youtube_id,time_start,time_end,split[,is_cc]`)."""

    youtube_id: str
    start: float
    end: float
    label: str | None  # None in the test csv, which has no label column
    split: str
    line: int

    @property
    def clip_stem(self) -> str | None:
        """File stem of the already-trimmed clip (`<id>_<start:06d>_<end:06d>`); None for fractional times."""
        if not (self.start.is_integer() and self.end.is_integer()):
            return None
        return f"{self.youtube_id}_{int(self.start):06d}_{int(self.end):06d}"


# --- class index ---------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^\s*(\d+)[\s,]+(\S.*?)\s*$")


def parse_class_index(text: str, source: str) -> list[str]:
    """Class names in index order.

    Two forms: numbered lines "1 ApplyEyeMakeup" (UCF101's classInd.txt; numbers consecutive from 1
    or from 0, in any order; returned 0-based) or one name per line (index = line order).
    """
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if not lines:
        raise InputError(f"{source}: class index file is empty")
    matches = [_NUMBERED.match(raw) for _, raw in lines]
    if all(matches):
        numbered = sorted((int(m.group(1)), n, m.group(2)) for (n, _), m in zip(lines, matches, strict=True))
        base = numbered[0][0]
        if base not in (0, 1):
            raise InputError(f"{source}:{numbered[0][1]}: class numbers must start at 1 (or 0), got {base}")
        for expected, (number, n, _) in enumerate(numbered, base):
            if number != expected:
                raise InputError(f"{source}:{n}: class number {number}, expected {expected} (gap or repeat)")
        names = [name for _, _, name in numbered]
    else:
        names = [raw for _, raw in lines]
    seen: dict[str, int] = {}
    for (n, _), name in zip(lines, names, strict=True):
        if name in seen:
            raise InputError(f"{source}:{n}: class {name!r} listed twice")
        seen[name] = n
    return names


# --- UCF101 --------------------------------------------------------------------------------------
_UCF_LIST = re.compile(r"^(train|test)list0*(\d+)\.txt$")


def ucf101_list_name(filename: str) -> tuple[str, int] | None:
    """("train"|"test", split) for "trainlist01.txt"/"testlist03.txt", None for any other name."""
    m = _UCF_LIST.match(filename)
    return (m.group(1), int(m.group(2))) if m else None


def parse_ucf101_list(
    text: str, source: str, classes: Sequence[str], split: int, subset: str
) -> list[Record]:
    """Records of one UCF101 list, in set `split{N}-{subset}`.

    Lines are "<Class>/<video>.avi <label>" (trainlist, label 1-based in classInd order) or
    "<Class>/<video>.avi" (testlist). The class is the folder part; it must be in `classes`
    (classInd order), and a stated label must agree with it.
    """
    index = {name: i for i, name in enumerate(classes)}
    set_name = f"split{split}-{subset}"
    extra: Extra = (("split", split), ("subset", subset))
    records = []
    for n, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        path = fields[0]
        folder, _, video = path.rpartition("/")
        if len(fields) > 2 or not folder or not video or (len(fields) == 2 and not fields[1].isdigit()):
            raise InputError(
                f"{source}:{n}: malformed line {raw.strip()!r}, expected '<Class>/<video> [<label>]'"
            )
        label = folder.split("/")[-1]
        if label not in index:
            raise InputError(f"{source}:{n}: class {label!r} is not in the class index")
        if len(fields) == 2 and int(fields[1]) - 1 != index[label]:
            raise InputError(
                f"{source}:{n}: label {fields[1]} disagrees with class {label!r} "
                f"(number {index[label] + 1} in the class index)"
            )
        records.append(Record(path, set_name, label, index[label], extra=extra, line=n))
    return records


# --- HMDB51 --------------------------------------------------------------------------------------
_HMDB_SPLIT = re.compile(r"^(.+)_test_split(\d+)\.txt$")
HMDB_SUBSETS = {"1": "train", "2": "test"}  # "0": not used in this split


def hmdb51_split_name(filename: str) -> tuple[str, int] | None:
    """(class, split) for "brush_hair_test_split1.txt", None for any other name."""
    m = _HMDB_SPLIT.match(filename)
    return (m.group(1), int(m.group(2))) if m else None


def parse_hmdb51_split(text: str, source: str, label: str, split: int) -> list[Record]:
    """Records of one `<class>_test_split<N>.txt`: "<video>.avi <0|1|2>" lines, 1 train, 2 test.

    Videos marked 0 are not used in this split and give no record. Paths are "<class>/<video>",
    the layout of the extracted HMDB51 archives.
    """
    records = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        fields = raw.strip().rsplit(None, 1)
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise InputError(f"{source}:{n}: malformed line {raw.strip()!r}, expected '<video> <0|1|2>'")
        video, code = fields
        if "/" in video:
            raise InputError(f"{source}:{n}: malformed line {raw.strip()!r}, expected a file name")
        if code == "0":
            continue
        subset = HMDB_SUBSETS[code]
        extra: Extra = (("split", split), ("subset", subset))
        records.append(Record(f"{label}/{video}", f"split{split}-{subset}", label, extra=extra, line=n))
    return records


# --- csv helpers ---------------------------------------------------------------------------------
def _csv_rows(text: str, source: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a headed csv whose header holds `required`; cells stripped, blank rows skipped."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise InputError(f"{source}: empty csv (no header)")
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{source}: csv lacks required column(s) {', '.join(missing)} (header: {','.join(header)})"
        )
    try:
        for row in reader:
            if None in row:
                raise InputError(f"{source}:{reader.line_num}: more cells than header columns")
            cells = {k: (v or "").strip() for k, v in row.items()}
            if any(cells.values()):
                yield reader.line_num, cells
    except csv.Error as e:
        raise InputError(f"{source}:{reader.line_num}: malformed csv ({e})") from e


def _number(value: str | float | int | None, source: str, line: int, column: str) -> float | None:
    """A finite float from a cell; None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InputError(f"{source}:{line}: {column} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{source}:{line}: {column} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{source}:{line}: {column} must be finite, got {value!r}")
    return number


def _check_span(start: float | None, end: float | None, source: str, line: int) -> None:
    if start is not None and start < 0:
        raise InputError(f"{source}:{line}: start {start:g} is negative")
    if start is not None and end is not None and end <= start:
        raise InputError(f"{source}:{line}: end {end:g} is not after start {start:g}")


# --- Kinetics ------------------------------------------------------------------------------------
def parse_kinetics_csv(text: str, source: str, default_split: str = "train") -> list[KineticsRow]:
    """Rows of a Kinetics csv. `label` may be absent (test csv); `split` defaults to `default_split`."""
    rows = []
    for n, cells in _csv_rows(text, source, ("youtube_id", "time_start", "time_end")):
        youtube_id = cells["youtube_id"]
        if not youtube_id or "/" in youtube_id:
            raise InputError(f"{source}:{n}: bad youtube_id {youtube_id!r}")
        start = _number(cells["time_start"], source, n, "time_start")
        end = _number(cells["time_end"], source, n, "time_end")
        if start is None or end is None:
            raise InputError(f"{source}:{n}: time_start and time_end are required")
        _check_span(start, end, source, n)
        label = cells.get("label") or None
        rows.append(KineticsRow(youtube_id, start, end, label, cells.get("split") or default_split, n))
    return rows


# --- ESC-50 --------------------------------------------------------------------------------------
def parse_esc50_csv(text: str, source: str) -> list[Record]:
    """Records of ESC-50's `meta/esc50.csv`, in sets `fold1`..`fold5`; class_index = target."""
    records = []
    for n, cells in _csv_rows(text, source, ("filename", "fold", "target", "category")):
        fold, target = cells["fold"], cells["target"]
        if not fold.isdigit() or not target.isdigit() or not cells["filename"] or not cells["category"]:
            raise InputError(
                f"{source}:{n}: malformed row (fold and target must be integers, names non-empty)"
            )
        records.append(
            Record(
                cells["filename"],
                f"fold{int(fold)}",
                cells["category"],
                int(target),
                extra=(("fold", int(fold)),),
                line=n,
            )
        )
    return records


# --- manifests -----------------------------------------------------------------------------------
def _manifest_record(fields: dict, source: str, line: int, default_set: str) -> Record:
    path = fields.get("path")
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"{source}:{line}: 'path' is missing or empty")
    label = fields.get("label")
    if label is not None and not isinstance(label, (str, int)):
        raise InputError(f"{source}:{line}: 'label' must be text, got {label!r}")
    label = str(label).strip() if label is not None and str(label).strip() else None
    set_name = fields.get("set") or fields.get("split") or default_set
    if not isinstance(set_name, str) or "/" in set_name:
        raise InputError(f"{source}:{line}: bad set name {set_name!r}")
    start = _number(fields.get("start"), source, line, "start")
    end = _number(fields.get("end"), source, line, "end")
    _check_span(start, end, source, line)
    return Record(path.strip(), set_name.strip(), label, None, start, end, line=line)


def parse_manifest_csv(text: str, source: str, default_set: str = "train") -> list[Record]:
    """Records of a csv manifest: column `path`; optional `label`, `start`, `end`, `set` (or `split`)."""
    return [
        _manifest_record(cells, source, n, default_set) for n, cells in _csv_rows(text, source, ("path",))
    ]


def parse_manifest_jsonl(text: str, source: str, default_set: str = "train") -> list[Record]:
    """Records of a jsonl manifest: one object per line with the keys of the csv manifest."""
    records = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{source}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(fields, dict):
            raise InputError(f"{source}:{n}: expected a JSON object, got {type(fields).__name__}")
        records.append(_manifest_record(fields, source, n, default_set))
    return records


# --- AudioSet ------------------------------------------------------------------------------------
AUDIOSET_CLASS_HEADER = ("index", "mid", "display_name")
_AUDIOSET_COLUMNS = ("ytid", "start_seconds", "end_seconds", "positive_labels")
_AUDIOSET_ROW = "expected 'YTID, start_seconds, end_seconds, \"mid1,mid2,...\"'"


@dataclass(frozen=True)
class AudioSetClass:
    """One line of AudioSet's `class_labels_indices.csv`."""

    index: int
    mid: str  # the ontology's class id, "/m/09x0r"
    name: str  # its display name, "Speech"


@dataclass(frozen=True)
class AudioSetRow:
    """One segment of an AudioSet csv: a span of a YouTube video and the class ids heard in it."""

    youtube_id: str
    start: float
    end: float
    mids: tuple[str, ...]  # as listed, at least one
    line: int

    @property
    def clip_stems(self) -> tuple[str, ...]:
        """File stems of an already-trimmed clip, in lookup order (see docs/shard.md).

        `<id>_<start:06d>_<end:06d>` (seconds, Kinetics' convention; integer times only), then
        `<id>_<start_ms>_<end_ms>` (milliseconds, audiosetdl; truncated and rounded, which differ
        only when the float product falls just under an integer).
        """
        stems = []
        if self.start.is_integer() and self.end.is_integer():
            stems.append(f"{self.youtube_id}_{int(self.start):06d}_{int(self.end):06d}")
        for to_int in (int, round):
            stem = f"{self.youtube_id}_{to_int(self.start * 1000)}_{to_int(self.end * 1000)}"
            if stem not in stems:
                stems.append(stem)
        return tuple(stems)


def _audioset_header(raw: str) -> bool:
    """True for the column line `# YTID, start_seconds, end_seconds, positive_labels` (the # optional)."""
    cells = [c.strip().lower() for c in raw.lstrip("#").split(",")]
    return tuple(cells) == _AUDIOSET_COLUMNS


def is_audioset_csv(head: str) -> bool:
    """True when the first lines of a csv are AudioSet's: `#` comment lines naming the columns
    `YTID, start_seconds, end_seconds, positive_labels`, that line as a plain header, or no header
    and a first row of four cells whose last is a class id list ("/m/09x0r,...")."""
    for raw in head.splitlines():
        if not raw.strip():
            continue
        if _audioset_header(raw):
            return True
        if not raw.lstrip().startswith("#"):
            return _audioset_like_row(raw)
    return False


def _audioset_like_row(raw: str) -> bool:
    try:
        cells = next(csv.reader([raw], skipinitialspace=True), [])
    except csv.Error:
        return False
    return len(cells) == 4 and cells[3].strip().startswith("/")


def audioset_set_name(filename: str) -> str:
    """The set a segments csv holds: `balanced_train_segments.csv` -> `balanced_train`, `eval_segments.csv`
    -> `eval`, any other csv -> its stem."""
    stem = filename.replace("\\", "/").rpartition("/")[2]
    stem = stem[:-4] if stem.lower().endswith(".csv") else stem
    return stem.removesuffix("_segments") or stem


def parse_audioset_classes(text: str, source: str) -> list[AudioSetClass]:
    """Classes of `class_labels_indices.csv` (`index,mid,display_name`), in index order.

    Indices must be 0..n-1, each once (any line order); class ids must be unique.
    """
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    try:
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise InputError(f"{source}:{reader.line_num}: malformed csv ({e})") from e
    expected = ",".join(AUDIOSET_CLASS_HEADER)
    header = tuple(cell.strip() for cell in rows[0][1]) if rows else ()
    if header != AUDIOSET_CLASS_HEADER:
        raise InputError(
            f"{source}: not an AudioSet class index: header {','.join(header)!r}, expected {expected!r}"
        )
    classes: dict[int, AudioSetClass] = {}
    lines: dict[str, int] = {}
    for n, row in rows[1:]:
        cells = [cell.strip() for cell in row]
        if len(cells) != 3 or not cells[0].isdigit() or not cells[1] or not cells[2]:
            raise InputError(
                f"{source}:{n}: malformed row {','.join(row)!r}, expected '<index>,<mid>,<display name>'"
            )
        index, mid, name = int(cells[0]), cells[1], cells[2]
        if index in classes:
            raise InputError(f"{source}:{n}: index {index} listed twice")
        if mid in lines:
            raise InputError(f"{source}:{n}: class id {mid!r} listed twice (first on line {lines[mid]})")
        classes[index] = AudioSetClass(index, mid, name)
        lines[mid] = n
    if not classes:
        raise InputError(f"{source}: no classes")
    if sorted(classes) != list(range(len(classes))):
        gap = next(i for i in range(len(classes)) if i not in classes)
        raise InputError(f"{source}: indices are not 0..{len(classes) - 1} (no index {gap})")
    return [classes[i] for i in range(len(classes))]


def parse_audioset_csv(text: str, source: str) -> list[AudioSetRow]:
    """Rows of an AudioSet segments csv: `YTID, start_seconds, end_seconds, "mid1,mid2,..."`.

    `#` lines (the official files' three comment lines) and a plain column header are skipped.
    """
    rows = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#") or _audioset_header(raw):
            continue
        rows.append(_audioset_row(raw, source, n))
    return rows


def _audioset_row(raw: str, source: str, n: int) -> AudioSetRow:
    try:
        cells = [cell.strip() for cell in next(csv.reader([raw], skipinitialspace=True), [])]
    except csv.Error as e:
        raise InputError(f"{source}:{n}: malformed csv ({e})") from e
    if len(cells) != 4 or not cells[0] or "/" in cells[0]:
        raise InputError(f"{source}:{n}: malformed row {raw.strip()[:80]!r}, {_AUDIOSET_ROW}")
    start = _number(cells[1], source, n, "start_seconds")
    end = _number(cells[2], source, n, "end_seconds")
    if start is None or end is None:
        raise InputError(f"{source}:{n}: start_seconds and end_seconds are required")
    _check_span(start, end, source, n)
    if not cells[3]:
        raise InputError(f"{source}:{n}: empty label list")
    mids = tuple(mid.strip() for mid in cells[3].split(","))
    if not all(mids):
        raise InputError(f"{source}:{n}: empty class id in the label list {cells[3]!r}")
    return AudioSetRow(cells[0], start, end, mids, n)


def audioset_class_indices(
    row: AudioSetRow, index: dict[str, int], source: str, classes_source: str
) -> tuple[int, ...]:
    """The row's class indices, sorted and distinct; an id not in `index` is an InputError."""
    for mid in row.mids:
        if mid not in index:
            raise InputError(f"{source}:{row.line}: class id {mid!r} is not in {classes_source}")
    return tuple(sorted({index[mid] for mid in row.mids}))
