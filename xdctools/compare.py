"""Pretraining runs side by side, in the shape of the paper's Table 1: one row per method, plus the
randomly initialised encoders every run starts from (its iteration 0).

Reads what `xdctools train` leaves in a run folder (`result.json`, `recipe.yaml`); computing the table
is separate from reading, so it is tested on plain dicts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from xdctools.errors import InputError

METHOD_NAMES = {"sdc": "SDC", "mdc": "MDC", "cdc": "CDC", "xdc": "XDC", "superv": "Superv"}
COLUMNS = ("probe_video", "probe_audio", "nmi_video", "nmi_audio", "nmi_cdc")
HEADERS = {
    "probe_video": "video probe",
    "probe_audio": "audio probe",
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
        "iterations": result["iterations"],
    }


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def compare_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: 'Random init' (iteration 0 of the first run with probes there), then each run's final
    row (its last iteration: the features of the finished encoders, clustered and probed).

    Iteration 0 of a clustering run is the random encoders' features clustered, so its NMIs are the
    random-init NMIs; a supervised run has no clusters. When runs disagree on iteration 0 (other seeds
    or data), the row says so through `spread` (max - min of each column over the runs).
    """
    rows: list[dict[str, Any]] = []
    starts = [r["iterations"][0] for r in runs if r["iterations"][0].get("iteration") == 0]
    if starts:
        row: dict[str, Any] = {"label": "Random init", "run": "iteration 0", "iterations": 0}
        spread = {}
        for col in COLUMNS:
            values = [v for s in starts if (v := _finite(s.get(col))) is not None]
            row[col] = values[0] if values else None
            if len(values) > 1:
                spread[col] = max(values) - min(values)
        row["spread"] = spread
        rows.append(row)
    for r in runs:
        last = r["iterations"][-1]
        row = {
            "label": METHOD_NAMES.get(r["method"], r["method"]),
            "run": r["run"],
            "iterations": int(last.get("iteration", len(r["iterations"]) - 1)),
        }
        row.update({col: _finite(last.get(col)) for col in COLUMNS})
        rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table; columns no row has a value for are left out."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = [
        "| method | run | iterations | " + " | ".join(HEADERS[c] for c in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for r in rows:
        cells = [_cell(r.get(c)) for c in cols]
        lines.append(f"| {r['label']} | {r['run']} | {r['iterations']} | " + " | ".join(cells) + " |")
    spread = {c: v for r in rows for c, v in r.get("spread", {}).items() if v > 0 and c in cols}
    if spread:
        parts = ", ".join(f"{HEADERS[c]} by up to {v:.3f}" for c, v in spread.items())
        lines += ["", f"Random init differs between the runs ({parts}); the row shows the first run's."]
    return "\n".join(lines) + "\n"
