"""Inputs (folders, split lists, csvs, manifests) -> a Plan of jobs, found on disk by name, media unopened."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

from xdctools.errors import ConfigError, InputError
from xdctools.shard import annotations as ann
from xdctools.shard.jobs import Job, Plan

KINDS = (
    "class-tree",
    "folder",
    "audio",
    "kinetics-csv",
    "audioset-csv",
    "ucf101",
    "hmdb51",
    "esc50",
    "manifest",
)
# Pretraining drops videos without audio, as the paper does; downstream video sets keep them.
AUDIO_REQUIRED = {
    "class-tree": True,
    "folder": True,
    "kinetics-csv": True,
    "audioset-csv": True,
    "manifest": True,
    "ucf101": False,
    "hmdb51": False,
    "esc50": True,
    "audio": True,
}
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpeg", ".mpg", ".m4v", ".flv", ".3gp", ".ts", ".wmv", ".ogv"}
)
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac"})
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
HEAD_CHARS = 4096  # of a csv, enough to tell AudioSet's comment lines from a Kinetics header
CLASS_INDEX_NAME = "classInd.txt"  # picked up from a class tree's root when no class file is given
AUDIOSET_CLASSES_NAME = "class_labels_indices.csv"  # picked up beside an AudioSet csv
DEFAULT_SET = "train"


def build_plan(
    root: str | Path,
    *,
    kind: str | None = None,
    csv: Path | Sequence[Path] | None = None,
    splits: Path | None = None,
    split_ids: Sequence[int] | str | None = None,
    manifest: Path | None = None,
    classes: Path | None = None,
    set_name: str | None = None,
) -> Plan:
    """The jobs for `xdctools shard`, grouped into shard sets.

    `root` is the media folder (for `manifest`, it may be the manifest file itself); `kind` is one of
    KINDS or None to detect it (see `detect_kind`). `split_ids` picks UCF101/HMDB51 splits (default
    [1]) or ESC-50 folds (default all); "all" takes every one found. `classes` is a class index file
    ("1 Name" lines or one name per line; AudioSet's `class_labels_indices.csv`) that fixes class names
    and indices. `set_name` names the single set of unsplit inputs (default "train"; an AudioSet csv's
    set is named after the file, see `annotations.audioset_set_name`).

    `csv` is one csv or several of one kind, planned together with one class index: each AudioSet csv
    gives its own set, named after its file; Kinetics rows go to the set their `split` column names.
    A set comes from one csv only, and `set_name` is refused with several (each names its own sets).

    Within a set, jobs are sorted by name and `index` is their position (`shuffle_plan` permutes
    them). Every set holds at least one job. Annotated files absent from disk are listed in
    `Plan.missing`.
    """
    root = Path(root)
    csvs = _csv_paths(csv)
    if manifest is None and kind in (None, "manifest") and root.suffix.lower() in MANIFEST_SUFFIXES:
        manifest = root
    if kind is None:
        kind = detect_kind(root, csv=csvs, splits=splits, manifest=manifest)
    if kind not in KINDS:
        raise ConfigError(f"unknown input kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind == "manifest":
        if manifest is None:
            raise ConfigError(f"{root}: kind 'manifest' needs a manifest file (csv or jsonl)")
        return _plan_manifest(Path(manifest), classes, set_name or DEFAULT_SET)
    _check_dir(root)
    if kind in ("class-tree", "folder", "audio"):
        return _plan_tree(root, kind, classes, set_name or DEFAULT_SET)
    if kind in ("kinetics-csv", "audioset-csv"):
        if not csvs:
            what = "a Kinetics" if kind == "kinetics-csv" else "an AudioSet segments"
            raise ConfigError(f"{root}: kind {kind!r} needs {what} csv file")
        _check_csv_set_name(csvs, set_name)
        if kind == "audioset-csv":
            return _plan_audioset(root, csvs, classes, set_name)
        return _plan_kinetics(root, csvs, classes, set_name or DEFAULT_SET)
    if kind == "esc50":
        return _plan_esc50(root, None if splits is None else Path(splits), split_ids, classes)
    if splits is None:
        raise ConfigError(f"{root}: kind {kind!r} needs the folder of its split files")
    if kind == "ucf101":
        return _plan_ucf101(root, Path(splits), split_ids, classes)
    return _plan_hmdb51(root, Path(splits), split_ids, classes)


def shuffle_plan(plan: Plan, seed: int) -> Plan:
    """The jobs of each set in a seeded random order, renumbered.

    Name order is class order for class folders, csvs and split lists, and DALI's reader mixes only
    within its shuffle buffer (1,024 samples): on name-ordered shards a training batch holds a few
    neighbouring classes (measured on the digits set: no 3 or 4 in the first 512 clips of every epoch).
    WebDataset's advice holds: shuffle before sharding. The permutation is a function of the seed, the
    set's name and its name-sorted jobs, so a rerun, a resume or another node computes the same plan.
    """
    if plan.shuffle_seed is not None:
        raise ConfigError("shuffle_plan: the plan is already shuffled")
    sets = {}
    for set_name, jobs in plan.sets.items():
        order = list(jobs)
        random.Random(f"xdctools-shard/{seed}/{set_name}").shuffle(order)
        sets[set_name] = [replace(job, index=i) for i, job in enumerate(order)]
    return replace(plan, sets=sets, shuffle_seed=seed)


def detect_kind(
    root: Path,
    *,
    csv: Path | Sequence[Path] | None = None,
    splits: Path | None = None,
    manifest: Path | None = None,
) -> str:
    """The input kind implied by the arguments, else by the root's layout (only names are looked at,
    and the first lines of a csv). Several csvs must be of one kind."""
    if splits is not None:
        return _splits_kind(Path(splits))
    csvs = _csv_paths(csv)
    if csvs:
        return _csvs_kind(csvs)
    if manifest is not None:
        return "manifest"
    _check_dir(root)
    if (root / "meta" / "esc50.csv").is_file():
        return "esc50"
    videos = list_media(root, VIDEO_SUFFIXES)
    if videos:
        return "class-tree" if any("/" in v for v in videos) else "folder"
    if list_media(root, AUDIO_SUFFIXES):
        return "audio"
    raise InputError(
        f"{root}: no video or audio files found ({_suffix_list(VIDEO_SUFFIXES | AUDIO_SUFFIXES)})"
    )


def list_media(root: Path, suffixes: Iterable[str]) -> list[str]:
    """Sorted POSIX paths, relative to `root`, of files whose suffix (any case) is in `suffixes`.

    Hidden files and folders are skipped; linked folders are followed, each real folder once.
    """
    wanted = frozenset(suffixes)
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                found.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found)


def load_classes(path: Path) -> list[str]:
    """Class names in index order from a class index file (see `annotations.parse_class_index`)."""
    return ann.parse_class_index(_read_text(Path(path), "class index file"), str(path))


# --- finding annotated files among those on disk --------------------------------------------------
class _FileIndex:
    """Lookups of annotated names among the media files under one folder."""

    def __init__(self, rel_paths: list[str]) -> None:
        self.exact = set(rel_paths)
        self.by_key: dict[str, list[str]] = {}  # lower-cased path without suffix -> paths
        self.by_stem: dict[str, list[str]] = {}  # file stem (case kept: YouTube ids) -> paths
        for rel in rel_paths:  # sorted, so every list is sorted
            base, _ = os.path.splitext(rel)
            self.by_key.setdefault(base.lower(), []).append(rel)
            self.by_stem.setdefault(base.rpartition("/")[2], []).append(rel)

    def path(self, rel: str) -> str | None:
        """`rel` itself, else the same path in another case or with another video suffix."""
        if rel in self.exact:
            return rel
        hits = self.by_key.get(os.path.splitext(rel)[0].lower())
        return hits[0] if hits else None

    def stem(self, stem: str, folder: str | None = None) -> str | None:
        """A file named `stem` anywhere; one in a folder named `folder` first."""
        hits = self.by_stem.get(stem)
        if not hits:
            return None
        if folder is not None:
            for rel in hits:
                if PurePosixPath(rel).parent.name == folder:
                    return rel
        return hits[0]


def _missing(path: str, set_name: str, source: str | None = None) -> dict:
    """An annotated file not found on disk; `source` is the annotation's "file:line" when known."""
    entry = {"path": path, "reason": "missing_file", "set": set_name}
    return entry if source is None else {**entry, "source": source}


def _classes(
    labels: list[str], classes_file: Path | None, source: Path
) -> tuple[list[str], Callable[[str | None, str], int]]:
    """The classes (`classes_file`'s, else `labels`, found in `source`) and their label -> index map."""
    classes = labels if classes_file is None else load_classes(classes_file)
    return classes, _indexer(classes, str(classes_file or source))


def _indexer(classes: list[str], source: str) -> Callable[[str | None, str], int]:
    """label -> class index (-1 for None); an unknown label is an InputError naming `where`."""
    index = {name: i for i, name in enumerate(classes)}

    def class_index(label: str | None, where: str) -> int:
        if label is None:
            return -1
        if label not in index:
            raise InputError(f"{where}: class {label!r} is not in {source}")
        return index[label]

    return class_index


def _assemble(
    kind: str,
    classes: list[str],
    jobs: Iterable[Job],
    missing: list[dict],
) -> Plan:
    """Group jobs into sets, sort each by name and number it: the same inputs give the same plan."""
    grouped: dict[str, list[Job]] = {}
    for job in jobs:
        grouped.setdefault(job.set_name, []).append(job)
    sets = {}
    for set_name in sorted(grouped):
        ordered = sorted(grouped[set_name], key=lambda j: (j.name, j.start or 0.0, j.end or 0.0, j.path))
        sets[set_name] = [replace(job, index=i) for i, job in enumerate(ordered)]
    missing = sorted(missing, key=lambda m: (m["set"], m["path"]))
    return Plan(kind=kind, classes=classes, sets=sets, audio_required=AUDIO_REQUIRED[kind], missing=missing)


def _nothing_found(listing: Path, count: int, root: Path) -> InputError:
    return InputError(f"{listing}: none of its {count} listed files were found under {root}")


# --- class tree, flat folder, audio folder -------------------------------------------------------
def _plan_tree(root: Path, kind: str, classes_file: Path | None, set_name: str) -> Plan:
    suffixes = AUDIO_SUFFIXES if kind == "audio" else VIDEO_SUFFIXES
    files = list_media(root, suffixes)
    if not files:
        what = "audio" if kind == "audio" else "video"
        raise InputError(f"{root}: no {what} files found ({_suffix_list(suffixes)})")
    base = os.path.abspath(root)
    nested = [f for f in files if "/" in f]
    if kind == "folder" or not nested:
        jobs = [Job(set_name, -1, _join(base, f), f, audio_only=kind == "audio") for f in files]
        return _assemble("audio" if kind == "audio" else "folder", [], jobs, [])
    loose = [f for f in files if "/" not in f]
    if loose:
        raise InputError(
            f"{root}: {len(loose)} media file(s) sit beside the class folders (e.g. {loose[0]!r}); "
            "move them into a class folder"
        )
    if classes_file is None and (root / CLASS_INDEX_NAME).is_file():
        classes_file = root / CLASS_INDEX_NAME
    labels = sorted({f.split("/", 1)[0] for f in files})
    classes, class_index = _classes(labels, classes_file, root)
    jobs = []
    for f in files:
        label = f.split("/", 1)[0]
        index = class_index(label, str(root / label))
        jobs.append(Job(set_name, -1, _join(base, f), f, label, index, audio_only=kind == "audio"))
    return _assemble(kind, classes, jobs, [])


# --- csvs: one or several of one kind ------------------------------------------------------------
_CSV_WHAT = {"kinetics-csv": "a Kinetics csv", "audioset-csv": "an AudioSet segments csv"}


def _csv_paths(csv: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """`build_plan`'s `csv` as a list: none, one path, or several."""
    if csv is None:
        return []
    if isinstance(csv, (str, os.PathLike)):
        return [Path(csv)]
    return [Path(c) for c in csv]


def _csv_kind(csv_path: Path) -> str:
    head = _read_text(csv_path, "csv", limit=HEAD_CHARS)
    return "audioset-csv" if ann.is_audioset_csv(head) else "kinetics-csv"


def _csvs_kind(csv_paths: Sequence[Path]) -> str:
    """The kind of every csv; csvs of two kinds are an InputError naming one of each."""
    first = _csv_kind(csv_paths[0])
    for path in csv_paths[1:]:
        kind = _csv_kind(path)
        if kind != first:
            raise InputError(
                f"{path}: {_CSV_WHAT[kind]}, but {csv_paths[0]} is {_CSV_WHAT[first]} "
                "(csvs of one kind per run: shard each kind into its own folder)"
            )
    return first


def _check_csv_set_name(csv_paths: Sequence[Path], set_name: str | None) -> None:
    if set_name is not None and len(csv_paths) > 1:
        raise ConfigError(
            f"--set-name {set_name!r} with {len(csv_paths)} csvs: each csv names its own set "
            "(give --set-name with a single --csv only)"
        )


def _check_one_csv_per_set(sets_of_csvs: Iterable[tuple[Path, Iterable[str]]]) -> None:
    """Every set comes from one csv: a set that two csvs fill is an InputError naming both."""
    owner: dict[str, Path] = {}
    for path, set_names in sets_of_csvs:
        for set_name in sorted(set(set_names)):
            if set_name in owner:
                raise InputError(
                    f"{path}: its set {set_name!r} is also {owner[set_name]}'s "
                    "(with several csvs, each set must come from one csv)"
                )
            owner[set_name] = path


# --- Kinetics csv --------------------------------------------------------------------------------
def _plan_kinetics(
    root: Path, csv_paths: Sequence[Path], classes_file: Path | None, default_split: str
) -> Plan:
    """Each row in the set its `split` column names (`default_split` when it has none); the classes are
    `classes_file`'s, else every csv's labels, sorted."""
    listed = [(path, _kinetics_rows(path, default_split)) for path in csv_paths]
    _check_one_csv_per_set((path, (r.split for r in rows)) for path, rows in listed)
    labels = sorted({r.label for _, rows in listed for r in rows if r.label is not None})
    classes, class_index = _classes(labels, classes_file, csv_paths[0])
    index = _FileIndex(list_media(root, VIDEO_SUFFIXES))
    jobs, missing = [], []
    for csv_path, rows in listed:
        found, lost = _kinetics_jobs(index, os.path.abspath(root), csv_path, rows, class_index)
        if not found:
            raise _nothing_found(csv_path, len(rows), root)
        jobs += found
        missing += lost
    return _assemble("kinetics-csv", classes, jobs, missing)


def _kinetics_rows(csv_path: Path, default_split: str) -> list[ann.KineticsRow]:
    rows = ann.parse_kinetics_csv(_read_text(csv_path, "Kinetics csv"), str(csv_path), default_split)
    if not rows:
        raise InputError(f"{csv_path}: no rows")
    return rows


def _kinetics_jobs(
    index: _FileIndex,
    base: str,
    csv_path: Path,
    rows: list[ann.KineticsRow],
    class_index: Callable[[str | None, str], int],
) -> tuple[list[Job], list[dict]]:
    """The jobs of one csv's rows found on disk, and its rows that are not."""
    jobs, missing = [], []
    for row in rows:
        label_index = class_index(row.label, f"{csv_path}:{row.line}")
        extra = (("youtube_id", row.youtube_id),)
        stem = row.clip_stem
        clip = index.stem(stem, row.label) if stem else None
        if clip is not None:  # already trimmed to the annotated span
            jobs.append(Job(row.split, -1, _join(base, clip), clip, row.label, label_index, extra=extra))
            continue
        full = index.stem(row.youtube_id, row.label)
        if full is None:
            missing.append(_missing(stem or row.youtube_id, row.split, f"{csv_path}:{row.line}"))
            continue
        name = f"{full}#t={row.start:g},{row.end:g}"  # media-fragment suffix: one full video, many spans
        path = _join(base, full)
        jobs.append(Job(row.split, -1, path, name, row.label, label_index, row.start, row.end, extra=extra))
    return jobs, missing


# --- AudioSet csv --------------------------------------------------------------------------------
def _plan_audioset(
    root: Path, csv_paths: Sequence[Path], classes_file: Path | None, set_name: str | None
) -> Plan:
    """One multi-label set per csv, named after it (or `set_name`): each row a clip, its class ids mapped
    through the class index the csvs share (`class_labels_indices.csv`)."""
    set_names = [set_name] if set_name else [ann.audioset_set_name(p.name) for p in csv_paths]
    _check_one_csv_per_set((path, [name]) for path, name in zip(csv_paths, set_names, strict=True))
    listed = [(path, _audioset_rows(path)) for path in csv_paths]
    classes_path, classes = _audioset_class_index(csv_paths, classes_file)
    files = _AudioSetFiles(root, _segments_per_id([rows for _, rows in listed]))
    jobs, missing = [], []
    for (csv_path, rows), name in zip(listed, set_names, strict=True):
        found, lost = _audioset_jobs(files, csv_path, rows, name, classes, str(classes_path))
        if not found:
            raise _nothing_found(csv_path, len(rows), root)
        jobs += found
        missing += lost
    plan = _assemble("audioset-csv", [c.name for c in classes], jobs, missing)
    return replace(plan, multi_label=True, class_ids=[c.mid for c in classes])


def _audioset_rows(csv_path: Path) -> list[ann.AudioSetRow]:
    rows = ann.parse_audioset_csv(_read_text(csv_path, "AudioSet csv"), str(csv_path))
    if not rows:
        raise InputError(f"{csv_path}: no rows")
    return rows


def _audioset_jobs(
    files: _AudioSetFiles,
    csv_path: Path,
    rows: list[ann.AudioSetRow],
    set_name: str,
    classes: list[ann.AudioSetClass],
    classes_source: str,
) -> tuple[list[Job], list[dict]]:
    """The jobs of one csv's rows found on disk (each with its row's classes), and its rows that are not."""
    names = [c.name for c in classes]
    mid_index = {c.mid: c.index for c in classes}
    jobs, missing = [], []
    for row in rows:
        indices = ann.audioset_class_indices(row, mid_index, str(csv_path), classes_source)
        job = _audioset_job(files, row, set_name, tuple(names[i] for i in indices), indices)
        if job is None:
            where = f"{csv_path}:{row.line}"
            missing.append(_missing(f"{row.youtube_id}#t={row.start:g},{row.end:g}", set_name, where))
        else:
            jobs.append(job)
    return jobs, missing


def _audioset_class_index(
    csv_paths: Sequence[Path], classes_file: Path | None
) -> tuple[Path, list[ann.AudioSetClass]]:
    """The class index every csv uses: `classes_file`, else the one beside each csv, which must agree."""
    paths = [_audioset_classes_path(csv_path, classes_file) for csv_path in csv_paths]
    classes = _audioset_classes(paths[0])
    for path in paths[1:]:
        if path != paths[0] and _audioset_classes(path) != classes:
            raise InputError(
                f"{path}: differs from {paths[0]}, the class index beside {csv_paths[0]} "
                "(csvs sharded together share one class index; pass it with --classes)"
            )
    return paths[0], classes


def _audioset_classes(path: Path) -> list[ann.AudioSetClass]:
    return ann.parse_audioset_classes(_read_text(path, "AudioSet class index"), str(path))


def _segments_per_id(row_lists: Iterable[list[ann.AudioSetRow]]) -> Counter[str]:
    """How many segments of each video the csvs list: every row of a csv, but a segment that several csvs
    list counts as often as the one that lists it most (one csv: its rows per video, as before)."""
    spans: Counter[tuple[str, float, float]] = Counter()
    for rows in row_lists:
        spans |= Counter((row.youtube_id, row.start, row.end) for row in rows)
    per_id: Counter[str] = Counter()
    for (youtube_id, _, _), count in spans.items():
        per_id[youtube_id] += count
    return per_id


def _audioset_classes_path(csv_path: Path, classes_file: Path | None) -> Path:
    """The class index given, else `class_labels_indices.csv` beside the csv (InputError when absent)."""
    if classes_file is not None:
        return Path(classes_file)
    beside = csv_path.parent / AUDIOSET_CLASSES_NAME
    if not beside.is_file():
        raise InputError(
            f"{csv_path}: no {AUDIOSET_CLASSES_NAME} beside it (pass AudioSet's class index with --classes)"
        )
    return beside


def _audioset_job(
    files: _AudioSetFiles,
    row: ann.AudioSetRow,
    set_name: str,
    labels: tuple[str, ...],
    indices: tuple[int, ...],
) -> Job | None:
    """The row's job: an already-trimmed clip as it is, or a whole video trimmed to the row's span; None
    when neither is on disk."""
    common = {"extra": (("youtube_id", row.youtube_id),), "labels": labels, "class_indices": indices}
    clip = files.trimmed(row)
    if clip is not None:
        return Job(set_name, -1, files.path(clip), clip, audio_only=_is_audio(clip), **common)
    full = files.untrimmed(row)
    if full is None:
        return None
    name = f"{full}#t={row.start:g},{row.end:g}"  # media-fragment suffix: one full video, many spans
    span = {"start": row.start, "end": row.end}
    return Job(set_name, -1, files.path(full), name, audio_only=_is_audio(full), **span, **common)


def _is_audio(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in AUDIO_SUFFIXES


class _AudioSetFiles:
    """Where the clip of an AudioSet row is on disk, by the names AudioSet downloaders write.

    Video files first, then audio files (an audio-only download gives audio-only samples).
    """

    def __init__(self, root: Path, segments_per_id: Counter[str]) -> None:
        self.base = os.path.abspath(root)
        self.indexes = [
            _FileIndex(list_media(root, VIDEO_SUFFIXES)),
            _FileIndex(list_media(root, AUDIO_SUFFIXES)),
        ]
        self.segments_per_id = segments_per_id

    def path(self, rel: str) -> str:
        return _join(self.base, rel)

    def trimmed(self, row: ann.AudioSetRow) -> str | None:
        """`<id>_<start:06d>_<end:06d>`, `<id>_<start_ms>_<end_ms>`, or `Y<id>` when the csv holds one
        segment of that video (the name does not say which span it holds)."""
        stems = list(row.clip_stems)
        if self.segments_per_id[row.youtube_id] == 1:
            stems.append(f"Y{row.youtube_id}")
        return self._find(stems)

    def untrimmed(self, row: ann.AudioSetRow) -> str | None:
        """`<id>.<ext>`: the whole video, trimmed to the row's span while sharding."""
        return self._find([row.youtube_id])

    def _find(self, stems: list[str]) -> str | None:
        for index in self.indexes:
            for stem in stems:
                rel = index.stem(stem)
                if rel is not None:
                    return rel
        return None


# --- UCF101 and HMDB51 ---------------------------------------------------------------------------
def _plan_ucf101(
    root: Path, splits: Path, split_ids: Sequence[int] | str | None, classes_file: Path | None
) -> Plan:
    folder = _annotation_dir(
        splits, lambda names: any(ann.ucf101_list_name(n) for n in names), "UCF101 lists"
    )
    lists = {}
    for path in folder.iterdir():
        parsed = ann.ucf101_list_name(path.name)
        if parsed is not None:
            lists[parsed] = path
    available = sorted({split for _, split in lists})
    chosen = _choose(split_ids, available, folder, default=[1])
    for split in chosen:
        for subset in ("train", "test"):
            if (subset, split) not in lists:
                raise InputError(f"{folder}: split {split} has no {subset}list{split:02d}.txt")
    if classes_file is None and (folder / CLASS_INDEX_NAME).is_file():
        classes_file = folder / CLASS_INDEX_NAME
    if classes_file is None:
        raise InputError(f"{folder}: no {CLASS_INDEX_NAME} here (or pass a class index file)")
    classes = load_classes(classes_file)
    records = []
    for split in chosen:
        for subset in ("train", "test"):
            path = lists[(subset, split)]
            records += ann.parse_ucf101_list(
                _read_text(path, "UCF101 list"), str(path), classes, split, subset
            )
    return _match_records("ucf101", root, folder, classes, records, VIDEO_SUFFIXES)


def _plan_hmdb51(
    root: Path, splits: Path, split_ids: Sequence[int] | str | None, classes_file: Path | None
) -> Plan:
    folder = _annotation_dir(
        splits, lambda names: any(ann.hmdb51_split_name(n) for n in names), "HMDB51 splits"
    )
    files: dict[tuple[str, int], Path] = {}
    for path in folder.iterdir():
        parsed = ann.hmdb51_split_name(path.name)
        if parsed is not None:
            files[parsed] = path
    labels = sorted({label for label, _ in files})
    chosen = _choose(split_ids, sorted({split for _, split in files}), folder, default=[1])
    for split in chosen:
        absent = [label for label in labels if (label, split) not in files]
        if absent:
            raise InputError(f"{folder}: split {split} has no file for class(es) {', '.join(absent)}")
    classes, class_index = _classes(labels, classes_file, folder)
    records = []
    for split in chosen:
        for label in labels:
            path = files[(label, split)]
            index = class_index(label, str(path))
            for rec in ann.parse_hmdb51_split(_read_text(path, "HMDB51 split file"), str(path), label, split):
                records.append(replace(rec, class_index=index))
    return _match_records("hmdb51", root, folder, classes, records, VIDEO_SUFFIXES)


# --- ESC-50 --------------------------------------------------------------------------------------
def _plan_esc50(
    root: Path, splits: Path | None, split_ids: Sequence[int] | str | None, classes_file: Path | None
) -> Plan:
    csv_path = _esc50_csv(root if splits is None else splits)
    records = ann.parse_esc50_csv(_read_text(csv_path, "ESC-50 csv"), str(csv_path))
    if not records:
        raise InputError(f"{csv_path}: no rows")
    by_target: dict[int | None, tuple[str | None, int]] = {}  # target -> (category, first line)
    for rec in records:
        known = by_target.setdefault(rec.class_index, (rec.label, rec.line))
        if known[0] != rec.label:
            raise InputError(
                f"{csv_path}:{rec.line}: target {rec.class_index} is {rec.label!r}, "
                f"but {known[0]!r} on line {known[1]}"
            )
    if classes_file is None:
        if sorted(by_target) != list(range(len(by_target))):
            raise InputError(f"{csv_path}: targets are not 0..{len(by_target) - 1} without gaps")
        classes = [by_target[t][0] for t in range(len(by_target))]
    else:
        classes = load_classes(classes_file)
        class_index = _indexer(classes, str(classes_file))
        records = [replace(r, class_index=class_index(r.label, f"{csv_path}:{r.line}")) for r in records]
    folds = sorted({int(r.set_name.removeprefix("fold")) for r in records})
    chosen = set(_choose(split_ids, folds, csv_path, default=folds))
    records = [r for r in records if int(r.set_name.removeprefix("fold")) in chosen]
    audio_dir = root / "audio" if (root / "audio").is_dir() else root
    return _match_records("esc50", audio_dir, csv_path, classes, records, AUDIO_SUFFIXES, audio_only=True)


def _esc50_csv(path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in (path / "meta" / "esc50.csv", path / "esc50.csv"):
        if candidate.is_file():
            return candidate
    raise InputError(f"{path}: no ESC-50 meta/esc50.csv here")


def _match_records(
    kind: str,
    root: Path,
    listing: Path,
    classes: list[str],
    records: list[ann.Record],
    suffixes: frozenset[str],
    audio_only: bool = False,
) -> Plan:
    """Jobs for the records found under `root` (by relative path, else by file name); the rest missing."""
    index = _FileIndex(list_media(root, suffixes))
    base = os.path.abspath(root)
    jobs, missing = [], []
    for rec in records:
        posix = rec.path.replace("\\", "/")
        folder, _, filename = posix.rpartition("/")
        stem, parent = os.path.splitext(filename)[0], folder.rpartition("/")[2] or None
        rel = index.path(posix) or index.stem(stem, parent)
        if rel is None:
            missing.append(_missing(posix, rec.set_name))
            continue
        label_index = -1 if rec.class_index is None else rec.class_index
        path = _join(base, rel)
        jobs.append(
            Job(rec.set_name, -1, path, rel, rec.label, label_index, None, None, audio_only, rec.extra)
        )
    if not jobs:
        raise _nothing_found(listing, len(records), root)
    return _assemble(kind, classes, jobs, missing)


# --- manifests -----------------------------------------------------------------------------------
def _plan_manifest(path: Path, classes_file: Path | None, set_name: str) -> Plan:
    text = _read_text(path, "manifest")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = ann.parse_manifest_jsonl(text, str(path), set_name)
    elif suffix == ".csv":
        records = ann.parse_manifest_csv(text, str(path), set_name)
    else:
        raise InputError(f"{path}: a manifest must be .csv or .jsonl, not {path.suffix or 'no suffix'!r}")
    if not records:
        raise InputError(f"{path}: no rows")
    classes, class_index = _classes(
        sorted({r.label for r in records if r.label is not None}), classes_file, path
    )
    base = os.path.abspath(path.parent)
    jobs, missing = [], []
    for rec in records:
        name = _manifest_name(rec.path, base)
        full = _join(base, rec.path)
        index = class_index(rec.label, f"{path}:{rec.line}")
        if not os.path.isfile(full):
            missing.append(_missing(rec.path, rec.set_name, f"{path}:{rec.line}"))
            continue
        if rec.start is not None or rec.end is not None:
            name = f"{name}#t={_seconds(rec.start)},{_seconds(rec.end)}"
        audio_only = os.path.splitext(full)[1].lower() in AUDIO_SUFFIXES
        jobs.append(Job(rec.set_name, -1, full, name, rec.label, index, rec.start, rec.end, audio_only))
    if not jobs:
        raise _nothing_found(path, len(records), path.parent)
    return _assemble("manifest", classes, jobs, missing)


def _manifest_name(entry: str, base: str) -> str:
    """The entry's path relative to the manifest's folder when inside it, else its absolute path (POSIX)."""
    full = _join(base, entry)
    rel = os.path.relpath(full, base)
    return Path(rel).as_posix() if not rel.startswith("..") else Path(full).as_posix()


# --- small helpers -------------------------------------------------------------------------------
def _check_dir(root: Path) -> None:
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")


def _join(base: str, rel: str) -> str:
    return os.path.normpath(os.path.join(base, rel))


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _suffix_list(suffixes: Iterable[str]) -> str:
    return " ".join(sorted(suffixes))


def _read_text(path: Path, what: str, limit: int | None = None) -> str:
    """A text file's content, or its first `limit` characters (UTF-8, BOM dropped, CRLF read as LF)."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            return f.read(-1 if limit is None else limit)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None


def _choose(
    split_ids: Sequence[int] | str | None, available: list[int], where: Path, default: list[int]
) -> list[int]:
    """Requested split (or fold) numbers, checked against those present."""
    if split_ids is None:
        wanted = list(default)
    elif isinstance(split_ids, str):
        if split_ids.strip().lower() != "all":
            raise ConfigError(f"splits must be numbers or 'all', got {split_ids!r}")
        wanted = list(available)
    else:
        wanted = sorted({int(s) for s in split_ids})
    absent = [s for s in wanted if s not in available]
    if absent or not wanted:
        have = ", ".join(map(str, available)) or "none"
        raise InputError(f"{where}: split {', '.join(map(str, absent)) or '?'} not found (available: {have})")
    return wanted


def _annotation_dir(splits: Path, matches: Callable[[list[str]], bool], what: str) -> Path:
    """`splits` when its files match, else its only sub-folder that does (e.g. ucfTrainTestlist/)."""
    _check_dir(splits)
    if matches([p.name for p in splits.iterdir()]):
        return splits
    inner = [d for d in sorted(splits.iterdir()) if d.is_dir() and matches([p.name for p in d.iterdir()])]
    if len(inner) == 1:
        return inner[0]
    raise InputError(f"{splits}: no {what} found here")


def _splits_kind(splits: Path) -> str:
    """ucf101, hmdb51 or esc50, by the names of the split files."""
    if splits.is_file():
        if splits.suffix.lower() == ".csv":
            return "esc50"
        raise InputError(f"{splits}: expected a folder of split files (or ESC-50's esc50.csv)")
    _check_dir(splits)
    candidates = [splits, *(d for d in sorted(splits.iterdir()) if d.is_dir())]
    for folder in candidates:
        names = [p.name for p in folder.iterdir()]
        if any(ann.ucf101_list_name(n) for n in names) or CLASS_INDEX_NAME in names:
            return "ucf101"
        if any(ann.hmdb51_split_name(n) for n in names):
            return "hmdb51"
        if "esc50.csv" in names or (folder / "meta" / "esc50.csv").is_file():
            return "esc50"
    raise InputError(f"{splits}: not UCF101 lists, HMDB51 split files or ESC-50 meta (cannot tell the kind)")
