"""The downstream results table (the paper's Tables 3/4 shape): method × dataset × fc/all, merged across runs.

`<out>/results.json` is the record: {"format": 1, "entries": [...]}, one entry per (method, pretraining,
dataset, column), where column is "fc" (frozen encoder, linear classifier), "all" (full finetuning) or
"svm" (DCASE-style linear SVM). An entry holds the accuracy (mean over its splits, 0..1), each split's
accuracy, the best lr and the whole lr sweep when there was one, and what produced it (checkpoint,
recipe, run folder, time). A multi-label set's entry (AudioSet) holds `map` instead of `accuracy`
(mAP over the classes with a positive, 0..1; its splits and sweep are mAPs too) and its cell reads
"mAP 0.312", so the two are never mistaken for each other. `<out>/results.md` is drawn from it:

    | Method  | Pretraining | UCF101 fc | UCF101 all | HMDB51 fc | HMDB51 all | ESC50 fc | ESC50 all |
    | Scratch | None        | 6.0       | 54.5       | ...

Several runs (other datasets, modes, checkpoints, even at the same time) write into one table: each
merge holds an exclusive lock on `<out>/.results.lock`, re-reads the json, replaces the entry with the
same key (a rerun updates its cell) and rewrites both files atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xdctools.atomic import write_bytes_atomic
from xdctools.errors import DataError
from xdctools.eval_recipe import DATASETS

FORMAT = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LOCK_FILE = ".results.lock"
KEY = ("method", "pretraining", "dataset", "column")
COLUMN_ORDER = ("fc", "all", "svm")
METRICS = ("accuracy", "map")  # an entry holds one of them


# under the table's legend when a cell scores a multi-label set
MAP_NOTE = [
    "Multi-label sets (AudioSet): mAP, the mean over the classes with a positive among the test videos of",
    'each class\'s average precision, clip sigmoids averaged per video; shown as "mAP 0.312".',
]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of `<out>/results.json` (none when absent); DataError if it is not ours."""
    path = Path(out) / RESULTS_JSON
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); move it away to start a new table") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise DataError(f"{path}: not a results table of xdctools finetune (format {FORMAT})")
    return doc["entries"]


def merge_entry(out: str | os.PathLike, entry: Mapping[str, Any]) -> tuple[Path, Path]:
    """Add or replace one entry in `<out>/results.{json,md}` under the table lock; returns both paths."""
    folder = Path(out)
    missing = [k for k in (*KEY, "splits") if k not in entry]
    if not any(m in entry for m in METRICS):
        missing.append(" or ".join(METRICS))
    if missing:
        raise ValueError(f"results entry lacks {missing}")
    with _locked(folder):
        entries = [e for e in read_results(folder) if tuple(e.get(k) for k in KEY) != _key(entry)]
        entries.append(dict(entry))
        entries.sort(key=_sort_key)
        doc = {"format": FORMAT, "entries": entries}
        json_path = write_bytes_atomic(folder / RESULTS_JSON, (json.dumps(doc, indent=1) + "\n").encode())
        md_path = write_bytes_atomic(folder / RESULTS_MD, render_markdown(entries).encode())
    return json_path, md_path


def _key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(entry.get(k) for k in KEY)


def _dataset_rank(dataset: str) -> tuple[int, str]:
    order = list(DATASETS)
    return (order.index(dataset), "") if dataset in order else (len(order), dataset)


def _column_rank(column: str) -> int:
    return COLUMN_ORDER.index(column) if column in COLUMN_ORDER else len(COLUMN_ORDER)


def _sort_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        str(entry["method"]) != "Scratch",
        str(entry["method"]),
        str(entry["pretraining"]),
        _dataset_rank(str(entry["dataset"])),
        _column_rank(str(entry["column"])),
    )


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def is_map(entry: Mapping[str, Any]) -> bool:
    """Whether the entry scores a multi-label set (mAP) rather than accuracy."""
    return "map" in entry


def score_text(entry: Mapping[str, Any], value: float) -> str:
    """One of the entry's numbers as the table shows it: accuracy in %, mAP as a fraction (0.312, as
    AudioSet results are given)."""
    return f"{value:.3f}" if is_map(entry) else percent(value)


def cell_text(entry: Mapping[str, Any]) -> str:
    """The entry's table cell: "61.2" (accuracy %) or "mAP 0.312", † when not every split ran."""
    mark = "" if entry.get("all_splits", True) else "†"
    if is_map(entry):
        return f"mAP {float(entry['map']):.3f}{mark}"
    return percent(float(entry["accuracy"])) + mark


def render_markdown(entries: list[Mapping[str, Any]]) -> str:
    """The table (rows: method + pretraining; columns: dataset × fc/all/svm), then every lr sweep."""
    columns = sorted(
        {(str(e["dataset"]), str(e["column"])) for e in entries},
        key=lambda dc: (_dataset_rank(dc[0]), _column_rank(dc[1])),
    )
    titles = {str(e["dataset"]): str(e.get("title") or e["dataset"]) for e in entries}
    rows: dict[tuple[str, str], dict[tuple[str, str], Mapping[str, Any]]] = {}
    for e in entries:
        rows.setdefault((str(e["method"]), str(e["pretraining"])), {})[
            (str(e["dataset"]), str(e["column"]))
        ] = e
    lines = [
        "# Downstream results",
        "",
        "Top-1 accuracy (%), mean over the splits evaluated: UCF101/HMDB51 over their 3 official splits,",
        "ESC50/DCASE over their 5 folds. Test: 10 clips per video (centre crop; full 40x100 window for",
        "audio), softmax averaged per video. fc: frozen encoder, linear classifier; all: full finetuning;",
        "svm: linear SVM on pooled conv5 features. The best lr of a sweep is reported (Table 12).",
        "† not every official split (fold) was evaluated.",
        *(MAP_NOTE if any(is_map(e) for e in entries) else []),
        "",
        "| Method | Pretraining | " + " | ".join(f"{titles[d]} {c}" for d, c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for (method, pretraining), cells in rows.items():
        values = ["" if cells.get(dc) is None else cell_text(cells[dc]) for dc in columns]
        lines.append(f"| {method} | {pretraining} | " + " | ".join(values) + " |")
    details = _details(entries)
    if details:
        lines += ["", "## Per split and per learning rate", "", *details]
    return "\n".join(lines) + "\n"


def _details(entries: list[Mapping[str, Any]]) -> list[str]:
    """Per entry: each lr of its sweep (or its single run) with every split; the reported one in bold."""
    out = []
    for e in entries:
        splits = list(e["splits"])
        head = f"**{e['method']}** ({e['pretraining']}), {e.get('title', e['dataset'])} {e['column']}"
        head += " (mAP)" if is_map(e) else ""
        where = f" — `{e['run']}`" if e.get("run") else ""
        out += [
            head + where,
            "",
            "| setting | " + " | ".join(splits) + " | mean |",
            "|---|" + "---|" * (len(splits) + 1),
        ]
        sweep = e.get("sweep")
        if sweep:
            for row in sweep:
                best = row["lr"] == e.get("best_lr")
                cells = [score_text(e, row["splits"][s]) if s in row["splits"] else "" for s in splits]
                mean = score_text(e, row["mean"])
                label = f"lr {row['lr']:g}"
                if best:
                    label, mean = f"**{label}**", f"**{mean}**"
                out.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
        else:
            setting = ", ".join(f"{k} {v}" for k, v in (e.get("setting") or {}).items()) or "-"
            cells = [score_text(e, e["splits"][s]) for s in splits]
            mean = score_text(e, e["map" if is_map(e) else "accuracy"])
            out.append(f"| {setting} | " + " | ".join(cells) + f" | {mean} |")
        out.append("")
    return out[:-1] if out else out
