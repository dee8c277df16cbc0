"""Pretraining runs side by side, in the shape of the paper's Table 1: one row per method, plus the
randomly initialised encoders every run starts from (its iteration 0).

Reads what `xdctools train` leaves in a run folder (`result.json`, `recipe.yaml`); computing the table
is separate from reading, so it is tested on plain dicts.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from xdctools.errors import InputError

METHOD_NAMES = {"sdc": "SDC", "mdc": "MDC", "cdc": "CDC", "xdc": "XDC", "superv": "Superv"}
COLUMNS = (
    "probe_video",
    "probe_audio",
    "probe_map_video",
    "probe_map_audio",
    "nmi_video",
    "nmi_audio",
    "nmi_cdc",
)
PROBES = ("probe_video", "probe_audio")
HEADERS = {
    "probe_video": "video probe",
    "probe_audio": "audio probe",
    "probe_map_video": "video probe mAP",  # multi-label sets (AudioSet)
    "probe_map_audio": "audio probe mAP",
    "nmi_video": "NMI video clusters",
    "nmi_audio": "NMI audio clusters",
    "nmi_cdc": "NMI joint (CDC) clusters",
}


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """{run, method, seed, iterations} of a finished run; InputError naming the folder otherwise."""
    folder = Path(run_dir)
    try:
        result = json.loads((folder / "result.json").read_text())
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    except FileNotFoundError as e:
        raise InputError(f"{folder}: not a finished training run ({Path(e.filename).name} is missing)") from e
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InputError(f"{folder}: unreadable run files ({e})") from e
    if not isinstance(result.get("iterations"), list) or not result["iterations"]:
        raise InputError(f"{folder}/result.json: no iterations recorded")
    if not isinstance(recipe, dict) or "method" not in recipe:
        raise InputError(f"{folder}/recipe.yaml: no method")
    return {
        "run": folder.name,
        "method": str(recipe["method"]),
        "seed": recipe.get("seed"),
        "k": k_label(recipe.get("clustering")),
        "init": init_label(recipe.get("clustering")),
        "width": width_of(recipe.get("model")),
        "iterations": result["iterations"],
    }


def k_label(clustering: Any) -> str | None:
    """A run's k per view as its recipe states it: "256", "video 64, audio 128"; None without clustering."""
    if not isinstance(clustering, Mapping) or "k" not in clustering:
        return None
    k = clustering["k"]
    if isinstance(k, Mapping):
        return ", ".join(f"{view} {k[view]}" for view in ("video", "audio") if view in k)
    return str(k)


def width_of(model: Any) -> float | None:
    """The encoders' channel multiplier (`model.width`; absent: the default 1.0); None if unreadable."""
    if not isinstance(model, Mapping):
        return 1.0 if model is None else None
    width = model.get("width", 1.0)
    return float(width) if isinstance(width, int | float) else None


def init_label(clustering: Any) -> str | None:
    """Where a clustering run's first labels came from (`clustering.init`; recipes before it: random)."""
    if not isinstance(clustering, Mapping):
        return None
    return str(clustering.get("init") or "random")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def compare_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: 'Random init' (iteration 0 of the first run with probes there), then each run's final
    row (its last iteration: the features of the finished encoders, clustered and probed).

    Iteration 0 of a clustering run is the random encoders' features clustered, so its NMIs are the
    random-init NMIs; a supervised run has no clusters. When runs disagree on iteration 0 (other seeds
    or data), the row says so through `spread` (max - min of each column over the runs). Runs of several
    widths get a random-init row per width: encoders of another width are another random start.
    """
    rows: list[dict[str, Any]] = []
    widths = list(dict.fromkeys(r.get("width") for r in runs))
    for width in widths:
        starts = [s for r in runs if r.get("width") == width and (s := _start(r)) is not None]
        if not starts:
            continue
        row: dict[str, Any] = {
            "label": _random_label(width, widths),
            "run": "iteration 0",
            "iterations": 0,
            "method": None,
            "width": width,
        }
        spread = {}
        for col in COLUMNS:
            values = [v for s in starts if (v := _finite(s.get(col))) is not None]
            row[col] = values[0] if values else None
            if len(values) > 1:
                spread[col] = max(values) - min(values)
        row["spread"] = spread
        rows.append(row)
    for r, label in zip(runs, method_labels(runs), strict=True):
        last = r["iterations"][-1]
        row = {
            "label": label,
            "run": r["run"],
            "iterations": _final_iteration(r),
            "k": r.get("k"),
            "method": r["method"],
            "width": r.get("width"),
        }
        row.update({col: _finite(last.get(col)) for col in COLUMNS})
        rows.append(row)
    return rows


def mean_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The table over seeds: one row per method, each column the mean and sample standard deviation
    (`<col>_sd`) of the runs' final values, and a random-init row averaged over each seed's iteration 0.

    One run (one seed) says little when a probe swings by a few points between iterations; several seeds
    of each method, averaged, is how the comparison should be read. Runs of one seed and width share a
    random start, so it is counted once per (seed, width); each width has its own random-init row.
    """
    starts: dict[Any, dict[Any, list[Mapping[str, Any]]]] = {}  # width -> seed -> iteration-0 records
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for r, label in zip(runs, method_labels(runs), strict=True):
        methods.setdefault(label, []).append(r)
        if (start := _start(r)) is not None:
            starts.setdefault(r.get("width"), {}).setdefault(r.get("seed"), []).append(start)
    rows = []
    widths = list(dict.fromkeys(r.get("width") for r in runs))
    for width, per_seed in starts.items():
        firsts = [{col: _first_finite(col, group) for col in COLUMNS} for group in per_seed.values()]
        run = f"iteration 0 ({_count(len(per_seed), 'seed')})"
        row = _mean_row(_random_label(width, widths), run, 0, firsts)
        rows.append({**row, "method": None, "width": width})
    for label, group in methods.items():
        run = f"{_count(len(group), 'run')}: " + ", ".join(r["run"] for r in group)
        iterations = max(_final_iteration(r) for r in group)
        row = _mean_row(label, run, iterations, [r["iterations"][-1] for r in group])
        ks = sorted({r["k"] for r in group if r.get("k") is not None})
        row.update(k="; ".join(ks) or None, method=group[0]["method"], width=group[0].get("width"))
        rows.append(row)
    return rows


def _start(run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A run's iteration-0 record (its random encoders), None when the run did not record one."""
    first = run["iterations"][0]
    return first if first.get("iteration") == 0 else None


def _random_label(width: float | None, widths: Sequence[float | None]) -> str:
    return "Random init" if len(widths) == 1 else f"Random init (width {_width_text(width)})"


def method_labels(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's row label: "XDC", "XDC (handcrafted-only)" when its first labels did not come from the
    random encoders, and "..., width 0.25" when the runs compared are not all of one width (encoders of
    another width are another model: their runs are never averaged together)."""
    widths = {r.get("width") for r in runs}
    labels = []
    for r in runs:
        name = METHOD_NAMES.get(r["method"], r["method"])
        notes = [] if r.get("init") in (None, "random") else [str(r["init"])]
        if len(widths) > 1:
            notes.append(f"width {_width_text(r.get('width'))}")
        labels.append(f"{name} ({', '.join(notes)})" if notes else name)
    return labels


def _width_text(width: float | None) -> str:
    return "?" if width is None else f"{width:g}"


def gap_closed(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """label -> {probe column: (method - random init) / (Superv - random init)}: the share of the gap between
    the random encoders and supervised pretraining each method closes (1 = as good as Superv), each against
    the random init and Superv of its own width. Nothing for a width without both, or where Superv does not
    beat random init."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("method") in (None, "superv"):
            continue
        same = [s for s in rows if s.get("width") == r.get("width")]
        start = next((s for s in same if s.get("method") is None), None)
        ceiling = next((s for s in same if s.get("method") == "superv"), None)
        if start is None or ceiling is None:
            continue
        for col in PROBES:
            low, high, value = start.get(col), ceiling.get(col), r.get(col)
            if None not in (low, high, value) and high > low:
                out.setdefault(r["label"], {})[col] = (value - low) / (high - low)
    return out


def seed_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, paired against its own iteration 0: per modality the random-init probe, the final
    probe and its standard error, the gain, the cluster NMI at both ends, and how many iterations it took
    to reach half the final gain (`half_<col>`: None when it did not gain).

    Seeds differ in their random encoders, so a gain is only meaningful against the same run's start.
    """
    rows = []
    for r in runs:
        first, last = r["iterations"][0], r["iterations"][-1]
        if first.get("iteration", 0) != 0:
            raise InputError(f"{r['run']}: its first recorded iteration is not iteration 0")
        row: dict[str, Any] = {
            "run": r["run"],
            "method": r["method"],
            "seed": r.get("seed"),
            "init": r.get("init"),
            "width": r.get("width"),
            "iterations": _final_iteration(r),
        }
        for col in (*PROBES, "nmi_video", "nmi_audio", "nmi_cdc"):
            start, end = _finite(first.get(col)), _finite(last.get(col))
            row[f"{col}_start"], row[col] = start, end
            row[f"{col}_gain"] = None if start is None or end is None else end - start
        for col in PROBES:
            row[f"{col}_se"] = _finite(last.get(f"{col}_se"))
            row[f"half_{col}"] = iterations_to_half_gain(r["iterations"], col)
        rows.append(row)
    return rows


def iterations_to_half_gain(records: Sequence[Mapping[str, Any]], col: str) -> int | None:
    """The first iteration whose `col` is at least iteration 0's plus half the gain the run ends with."""
    start, end = _finite(records[0].get(col)), _finite(records[-1].get(col))
    if start is None or end is None or end <= start:
        return None
    target = start + (end - start) / 2
    for i, rec in enumerate(records[1:], 1):
        if (v := _finite(rec.get(col))) is not None and v >= target:
            return int(rec.get("iteration", i))
    return None  # unreachable: the last record reaches it


def render_seed_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-seed table: start -> end (gain) of each probe with its standard error, NMI start -> end,
    and the iterations to half the final gain; a last line with the gains' mean and standard deviation."""
    lines = [
        "| run | method | seed | init | width | video probe | audio probe | NMI video clusters "
        "| NMI audio clusters | iterations to half the gain (video / audio) |",
        "|---|---|---:|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        probes = [_paired(r, col, with_se=True) for col in PROBES]
        nmis = [_paired(r, col) for col in ("nmi_video", "nmi_audio")]
        half = " / ".join("–" if r[f"half_{c}"] is None else str(r[f"half_{c}"]) for c in PROBES)
        method = METHOD_NAMES.get(r["method"], r["method"])
        lines.append(
            f"| {r['run']} | {method} | {r['seed']} | {r['init'] or '–'} | {_width_text(r.get('width'))} | "
            + " | ".join(probes + nmis)
            + f" | {half} |"
        )
    gains = {c: [g for r in rows if (g := r.get(f"{c}_gain")) is not None] for c in PROBES}
    if all(len(g) > 1 for g in gains.values()):
        parts = ", ".join(
            f"{HEADERS[c]} {statistics.fmean(g):+.3f} ± {statistics.stdev(g):.3f}" for c, g in gains.items()
        )
        lines += ["", f"Gain over {len(rows)} runs (mean ± sd): {parts}."]
    return "\n".join(lines) + "\n"


def _paired(row: Mapping[str, Any], col: str, *, with_se: bool = False) -> str:
    start, end, gain = row.get(f"{col}_start"), row.get(col), row.get(f"{col}_gain")
    if start is None or end is None:
        return "–"
    se = row.get(f"{col}_se") if with_se else None
    return f"{start:.3f} → {end:.3f}" + (f" ± {se:.3f}" if se is not None else "") + f" ({gain:+.3f})"


def _final_iteration(run: Mapping[str, Any]) -> int:
    """The last record's iteration number (its position when a record does not say)."""
    return int(run["iterations"][-1].get("iteration", len(run["iterations"]) - 1))


def _first_finite(col: str, records: Sequence[Mapping[str, Any]]) -> float | None:
    return next((v for rec in records if (v := _finite(rec.get(col))) is not None), None)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _mean_row(label: str, run: str, iterations: int, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "run": run, "iterations": iterations}
    for col in COLUMNS:
        values = [v for rec in records if (v := _finite(rec.get(col))) is not None]
        row[col] = statistics.fmean(values) if values else None
        row[f"{col}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def _cell(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table; columns no row has a value for are left out."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    with_k = any(r.get("k") is not None for r in rows)
    lines = [
        "| method | run | iterations | "
        + ("k | " if with_k else "")
        + " | ".join(HEADERS[c] for c in cols)
        + " |",
        "|---|---|---:|" + ("---|" if with_k else "") + "---:|" * len(cols),
    ]
    for r in rows:
        cells = [_cell(r.get(c), r.get(f"{c}_sd")) for c in cols]
        k = f"{r.get('k') or '–'} | " if with_k else ""
        lines.append(f"| {r['label']} | {r['run']} | {r['iterations']} | {k}" + " | ".join(cells) + " |")
    closed = gap_closed(rows)
    if closed:
        parts = "; ".join(
            f"{label} " + ", ".join(f"{HEADERS[c].split()[0]} {v:.2f}" for c, v in cols_.items())
            for label, cols_ in closed.items()
        )
        lines += ["", f"Share of the random init → Superv gap closed: {parts}."]
    spread = {c: v for r in rows for c, v in r.get("spread", {}).items() if v > 0 and c in cols}
    if spread:
        parts = ", ".join(f"{HEADERS[c]} by up to {v:.3f}" for c, v in spread.items())
        lines += ["", f"Random init differs between the runs ({parts}); the row shows the first run's."]
    return "\n".join(lines) + "\n"
