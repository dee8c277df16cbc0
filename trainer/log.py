"""What a run leaves to read: metrics.jsonl, TensorBoard events, PNG plots and report.md.

`metrics.jsonl` is the record; TensorBoard events and plots are derived from it. One JSON object a
line, `{"event": ..., "step": <optimizer steps so far>, "time": <unix s>, **fields}`. The plots and
the report read these events and fields (others are kept and sent to TensorBoard, nothing more):

    step       iteration, epoch (float), lr, loss[_<head>], clips_per_s
    epoch      iteration, epoch (1-based within the iteration), lr, train_loss[_<head>],
               val_loss[_<head>], val_acc[_<head>], seconds
    cluster    iteration, view ("video" | "audio" | "cdc"), k, sizes (list of k ints), empty,
               nmi and purity (when true labels exist), objective
    probe      iteration, modality ("video" | "audio"), accuracy (0..1) or, on a multi-label set, map
               (mean average precision, 0..1), split ("held-out", "<k>-fold" or the eval set), train and
               test (videos fitted and scored), se (an accuracy's standard error over the videos scored)
    iteration  iteration, epochs (trained), stopped_early (bool), seconds

TensorBoard gets every numeric field as a scalar `event[/view|/modality|/head]/field` at `step`, and
numeric lists (cluster sizes) as histograms. On resume the run keeps the first `lines` records of
metrics.jsonl (from the checkpoint) and rebuilds the TensorBoard events from them, so both match a
run that was never interrupted. Only rank 0 writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdctools.atomic import write_bytes_atomic
from xdctools.errors import DataError
from xdctools.recipe import Recipe, recipe_digest

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.md"
RECIPE_FILE = "recipe.yaml"
PLOT_FILES = ("losses.png", "cluster_sizes.png", "nmi.png", "probe.png")
POSITION_KEYS = frozenset({"event", "step", "time", "iteration", "epoch"})
TAG_KEYS = ("view", "modality", "head")


class RunLogger:
    """Appends metric records to `run_dir/metrics.jsonl` and TensorBoard; draws the plots on request.

    resume: `state_dict()` of the logger as saved in the checkpoint being resumed; None starts fresh
    (records of an earlier attempt that never reached a checkpoint are dropped).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        resume: Mapping[str, Any] | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.lines = 0
        self._file: io.TextIOWrapper | None = None
        self._writer: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keep = int(resume["lines"]) if resume is not None else 0
        records = _truncate(self.run_dir / METRICS_FILE, keep)
        self.lines = keep
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            for record in records:
                self._to_tensorboard(record)

    def log(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Append one record (flushed at once) and send its numbers to TensorBoard; returns the record."""
        record = {"event": event, "step": int(step), "time": round(time.time(), 3)}
        record.update({key: _jsonable(value) for key, value in fields.items()})
        if not self.enabled or self._file is None:
            return record
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self.lines += 1
        self._to_tensorboard(record)
        return record

    def state_dict(self) -> dict[str, int]:
        """Saved in each checkpoint: how many records precede it."""
        return {"lines": self.lines}

    def plot(self) -> list[Path]:
        """Redraw the PNG plots from metrics.jsonl; returns the files written."""
        if not self.enabled:
            return []
        if self._file is not None:
            self._file.flush()
        return plot_metrics(self.run_dir)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _to_tensorboard(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        prefix = "/".join(
            [record["event"], *(str(record[k]) for k in TAG_KEYS if isinstance(record.get(k), str))]
        )
        step = record["step"]
        for key, value in record.items():
            if key in POSITION_KEYS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
            elif isinstance(value, list) and value and all(_is_number(v) for v in value):
                self._writer.add_histogram(f"{prefix}/{key}", np.asarray(value, dtype=np.float64), step)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    """Tensors, numpy values and paths as plain JSON values; non-finite floats as null."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())  # a 0-d array (a scalar tensor) gives a number
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _truncate(path: Path, keep: int) -> list[dict[str, Any]]:
    """Keep the first `keep` complete records of a metrics file (rewritten atomically); return them."""
    if not path.exists():
        if keep:
            raise DataError(f"{path}: missing, but the checkpoint follows {keep} metric records")
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # a last line without "\n" is partial
    if len(lines) < keep:
        raise DataError(
            f"{path}: has {len(lines)} complete records, the checkpoint follows {keep}: edited or another run"
        )
    kept = lines[:keep]
    if len(kept) != len(lines) or path.stat().st_size != sum(len(line.encode()) + 1 for line in kept):
        write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
    return [_parse(path, number, line) for number, line in enumerate(kept, 1)]


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {number}: not JSON ({e.msg})") from None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl (none when the file is absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [_parse(path, number, line) for number, line in enumerate(lines, 1)]


# --- plots -----------------------------------------------------------------------------------


def plot_metrics(run_dir: str | os.PathLike) -> list[Path]:
    """Draw losses.png, cluster_sizes.png, nmi.png and probe.png (those with data) from metrics.jsonl."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = []
    for name, draw in (
        ("losses.png", _plot_losses),
        ("cluster_sizes.png", _plot_cluster_sizes),
        ("nmi.png", lambda r: _plot_per_iteration(r, "cluster", "view", "nmi", "NMI with the true labels")),
        ("probe.png", _plot_probe),
    ):
        png = draw(records)
        if png is not None:
            written.append(write_bytes_atomic(run_dir / name, png))
    return written


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7.0, 4.0)) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: Agg rendering without global state

    fig = Figure(figsize=size, dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_losses(records: list[dict[str, Any]]) -> bytes | None:
    """Train and val losses per epoch over the whole run; dashed lines where an iteration starts."""
    epochs = [r for r in records if r["event"] == "epoch"]
    keys = sorted({k for r in epochs for k, v in r.items() if "loss" in k and _is_number(v)})
    if not keys:
        return None
    fig, axes = _figure()
    ax = axes[0][0]
    x = np.arange(1, len(epochs) + 1)
    for key in keys:
        y = [r.get(key) if _is_number(r.get(key)) else np.nan for r in epochs]
        ax.plot(x, y, marker="o", markersize=3, label=key, linestyle="--" if key.startswith("val") else "-")
    previous = None
    for i, r in enumerate(epochs):
        if previous is not None and r.get("iteration") != previous:
            ax.axvline(i + 0.5, color="grey", linewidth=0.8, linestyle=":")
        previous = r.get("iteration")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch (all iterations; dotted: new pseudo-labels)")
    ax.set_ylabel("cross-entropy")
    ax.set_title("losses per epoch")
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_cluster_sizes(records: list[dict[str, Any]]) -> bytes | None:
    """Per view, cluster sizes sorted largest first, one line per iteration (collapse shows as a cliff)."""
    by_view: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["event"] == "cluster" and isinstance(r.get("sizes"), list) and r["sizes"]:
            by_view[str(r.get("view", "?"))].append(r)
    if not by_view:
        return None
    views = sorted(by_view)
    fig, axes = _figure(1, len(views), (4.5 * len(views), 3.8))
    for ax, view in zip(axes[0], views, strict=True):
        for r in by_view[view]:
            sizes = np.sort(np.asarray(r["sizes"], dtype=np.int64))[::-1]
            ax.plot(np.arange(1, len(sizes) + 1), sizes, label=f"iteration {r.get('iteration')}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("cluster rank")
        ax.set_ylabel("members")
        ax.set_title(f"{view} clusters")
        ax.legend(fontsize=8)
    return _png(fig)


def _plot_per_iteration(
    records: list[dict[str, Any]], event: str, group: str, field: str, title: str
) -> bytes | None:
    """One line per group (view or modality): `field` against the iteration."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r["event"] == event and _is_number(r.get(field)):
            series[str(r.get(group, "?"))].append((int(r.get("iteration", 0)), float(r[field])))
    if not series:
        return None
    fig, axes = _figure(size=(6.0, 3.8))
    ax = axes[0][0]
    for name in sorted(series):
        xs, ys = zip(*series[name], strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(field)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_probe(records: list[dict[str, Any]]) -> bytes | None:
    """Probe accuracy per iteration, or mAP on a multi-label set (its records carry `map`)."""
    field = "map" if any(r["event"] == "probe" and "map" in r for r in records) else "accuracy"
    title = "linear probe mAP" if field == "map" else "linear probe accuracy"
    return _plot_per_iteration(records, "probe", "modality", field, title)


# --- report ----------------------------------------------------------------------------------


def hardware_info(world_size: int = 1) -> dict[str, Any]:
    """What the run ran on, for the report."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "processes": world_size,
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = ", ".join(names)
    return info


def write_report(run_dir: str | os.PathLike, recipe: Recipe, summary: Mapping[str, Any]) -> Path:
    """Write run_dir/report.md: what was run (recipe, data, method, hardware) and what came out.

    Per-iteration tables come from metrics.jsonl. `summary` (free-form, from the loop) may hold
    `status` (a line), `seconds`, `data` and `hardware` (mappings; hardware defaults to this
    machine), `effective` (`trainer.optim.effective_block`), and `final` (a mapping, or a mapping of
    mappings for a table); other keys are listed.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    lines = [f"# Run report: {recipe.name}", ""]
    if summary.get("status"):
        lines += [str(summary["status"]), ""]
    lines += ["## What was run", ""]
    lines += _what_was_run(run_dir, recipe, recipe_digest(recipe), summary)
    lines += ["", "## What came out", ""]
    lines += _training_table(records) or ["No training epoch was recorded."]
    clusters = _cluster_table(records)
    if clusters:
        lines += ["", "Clusters per iteration:", "", *clusters]
    probes = _probe_table(records)
    if probes:
        lines += ["", "Linear probes on the true labels (frozen features):", "", *probes]
    final = summary.get("final")
    if final:
        lines += ["", "## Final", "", *_mapping_table(final)]
    plots = [name for name in PLOT_FILES if (run_dir / name).exists()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name[:-4]}]({name})\n" for name in plots]
    known = {"status", "seconds", "data", "hardware", "final", "effective"}
    extra = {k: v for k, v in summary.items() if k not in known}
    if extra:
        lines += ["", "## Other", "", *(f"- {k}: {_show(v)}" for k, v in extra.items())]
    return write_bytes_atomic(run_dir / REPORT_FILE, ("\n".join(lines) + "\n").encode())


def _what_was_run(run_dir: Path, recipe: Recipe, digest: str, summary: Mapping[str, Any]) -> list[str]:
    o, d, m = recipe.optim, recipe.data, recipe.model
    recipe_ref = f"[{RECIPE_FILE}]({RECIPE_FILE})" if (run_dir / RECIPE_FILE).exists() else "not saved"
    out = [
        f"- recipe: `{recipe.name}` (digest `{digest}`), resolved copy: {recipe_ref}",
        f"- method: **{recipe.method}**, seed {recipe.seed}, {recipe.iterations} iteration(s)",
        f"- data: `{d.shards}` set `{d.train_set}`, {d.val_fraction:g} held out for the val loss; clips "
        f"{d.clip_frames}x{d.crop}x{d.crop} (stride {d.stride}, short side {d.short_side}), on {d.device}",
        f"- model: width {m.width:g}, video layout {m.video_layout}, precision {m.precision}",
    ]
    if recipe.clustering is not None:
        c = recipe.clustering
        out.append(
            f"- clustering: k {c.k_text}, {c.niter} k-means iterations, spherical {_show(c.spherical)}, "
            f"pca {_show(c.pca)}, uniform sampling {_show(c.uniform_sampling)}, "
            f"reseed empty {_show(c.reseed_empty)}"
        )
    if recipe.retrain is not None:
        r = recipe.retrain
        start = "random weights" if r.init == "scratch" else "the run's final weights"
        out.append(
            f"- retrain: the {r.encoder} encoder, from {start}, on the last cluster assignment of `{r.run}`"
        )
    stop = f"yes (patience {o.patience})" if o.early_stop else "no"
    out.append(
        f"- optimisation (Table 10 terms): es {o.epoch_size}, bs {o.batch_size}, lr {o.lr:g}, "
        f"we/se/te {o.warmup_epochs}/{o.step_epochs}/{o.total_epochs}, wd {o.weight_decay:g}, "
        f"gamma {o.gamma:g}, e-stop {stop}"
    )
    if recipe.clustering is not None and recipe.clustering.last_iteration is not None:
        given = recipe.clustering.last_iteration.given()
        if given:
            overrides = ", ".join(f"{k} {_show(v)}" for k, v in given.items())
            out.append(f"- last iteration overrides: {overrides}")
    effective = summary.get("effective")
    if effective:
        out.append(f"- effective schedule: {effective_line(effective)}")
        if "last_iteration" in effective:
            out.append(f"- effective schedule, last iteration: {effective_line(effective['last_iteration'])}")
    if summary.get("data"):
        out.append(f"- data found: {_show(summary['data'])}")
    hardware = summary.get("hardware") or hardware_info()
    out.append(f"- hardware: {_show(hardware)}")
    if summary.get("seconds") is not None:
        out.append(f"- wall time: {_hms(float(summary['seconds']))}")
    return out


def effective_line(e: Mapping[str, Any]) -> str:
    """One line of an effective schedule (`trainer.optim.effective_block`), for the report and the console."""
    return (
        f"{e['world_size']} rank(s), global batch {e['global_batch']}, lr {e['lr']:g} (warmup from "
        f"{e['warmup_start_lr']:g}), {e['steps_per_epoch']} steps/epoch, warmup {e['warmup_steps']} steps, "
        f"decay at steps {e['decay_steps']}, {e['total_steps']} steps at most"
    )


def _training_table(records: list[dict[str, Any]]) -> list[str]:
    """One row per iteration: epochs, early stop, the last epoch's losses and accuracies."""
    epochs: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["event"] == "epoch":
            epochs[int(r.get("iteration", 0))] = r
        elif r["event"] == "iteration":
            done[int(r.get("iteration", 0))] = r
    its = sorted(set(epochs) | set(done))
    if not its:
        return []
    keys = sorted(
        {k for r in epochs.values() for k, v in r.items() if _is_number(v) and ("loss" in k or "acc" in k)}
    )
    header = ["iteration", "epochs", "early stop", *keys]
    rows = []
    for it in its:
        last, end = epochs.get(it, {}), done.get(it, {})
        n = end.get("epochs", last.get("epoch", ""))
        stopped = {True: "yes", False: "no"}.get(end.get("stopped_early"), "")
        rows.append([str(it), _show(n), stopped, *(_show(last.get(k, "")) for k in keys)])
    return _table(header, rows)


def _cluster_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in records:
        if r["event"] != "cluster":
            continue
        sizes = np.asarray(r.get("sizes") or [], dtype=np.int64)
        empty = r.get("empty", int((sizes == 0).sum()) if sizes.size else "")
        stats = (
            [f"{sizes.min()}", f"{int(np.median(sizes))}", f"{sizes.max()}"] if sizes.size else ["", "", ""]
        )
        rows.append(
            [
                _show(r.get("iteration", "")),
                str(r.get("view", "")),
                _show(r.get("k", sizes.size or "")),
                _show(empty),
                *stats,
                _show(r.get("nmi", "")),
                _show(r.get("purity", "")),
            ]
        )
    header = ["iteration", "view", "k", "empty", "min size", "median", "max size", "NMI", "purity"]
    return _table(header, rows) if rows else []


def _probe_table(records: list[dict[str, Any]]) -> list[str]:
    table: dict[int, dict[str, Any]] = defaultdict(dict)
    modalities: list[str] = []
    for r in records:
        if r["event"] == "probe" and _is_number(r.get("accuracy", r.get("map"))):
            name = str(r.get("modality", "?")) + (" mAP" if "map" in r else "")
            value = _show(r.get("accuracy", r.get("map")))
            if _is_number(r.get("se")):
                value += f" ± {_show(r['se'])}"
            table[int(r.get("iteration", 0))][name] = value
            if name not in modalities:
                modalities.append(name)
    if not table:
        return []
    rows = [[str(it), *(_show(table[it].get(m, "")) for m in modalities)] for it in sorted(table)]
    return _table(["iteration", *modalities], rows)


def _mapping_table(final: Mapping[str, Any]) -> list[str]:
    if all(isinstance(v, Mapping) for v in final.values()):
        columns: list[str] = []
        for row in final.values():
            columns += [c for c in row if c not in columns]
        rows = [[str(name), *(_show(row.get(c, "")) for c in columns)] for name, row in final.items()]
        return _table(["", *columns], rows)
    return _table(["", "value"], [[str(k), _show(v)] for k, v in final.items()])


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _show(value: Any) -> str:
    """A value as the report shows it: yes / no / - for flags and none, 4 significant digits for floats."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value)
    return str(value)


def _hms(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
