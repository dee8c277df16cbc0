"""Look inside a shard folder: the dataset summary, and one sample's frames and mel as a PNG."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from xdctools.atomic import write_atomic
from xdctools.errors import DataError, InputError
from xdctools.shard import format as fmt
from xdctools.shard.read import DATASET_FILE, Location, Sample, decode_npy, locations, read_dataset_json

# --- reading ------------------------------------------------------------------------------------


def load_dataset(shards_dir: str | os.PathLike) -> dict:
    """`SHARDS/dataset.json`, or DataError when the folder holds no complete shard run."""
    root = Path(shards_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    dataset = read_dataset_json(root)
    if dataset is None:
        path = root / DATASET_FILE
        raise DataError(f"{path}: not found (not a shard folder, or the shard run is not complete)")
    return dataset


def shard_files(shards_dir: str | os.PathLike, dataset: dict) -> list[Path]:
    """Tar files in dataset order (sets, then shards); sorted `*/*.tar` when dataset.json lists none."""
    root = Path(shards_dir)
    listed = [root / entry["tar"] for entry in dataset.get("files", []) if "tar" in entry]
    return listed or sorted(root.glob("*/*.tar"))


def _read_indexed(loc: Location) -> Sample:
    """Seek straight to each member's data; the tar header before it must agree with the index."""
    tar_path, key, members = loc
    out = {}
    with open(tar_path, "rb") as f:
        for ext, (offset, size) in members.items():
            f.seek(offset - tarfile.BLOCKSIZE)
            try:
                header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
            except tarfile.TarError as exc:
                raise DataError(
                    f"{tar_path}: no tar header before {key}.{ext} ({exc}); rebuild the .idx"
                ) from exc
            if header.size != size or not f"{key}.{ext}".startswith(header.name.rstrip("/")):
                raise DataError(f"{tar_path}: index does not match the tar at {key}.{ext}; rebuild the .idx")
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"{tar_path}: truncated at {key}.{ext}")
            out[ext] = data
    return Sample(key=key, shard=tar_path, members=out)


def read_sample(shards_dir: str | os.PathLike, key: str | None = None, dataset: dict | None = None) -> Sample:
    """The sample `key` (default: the first sample of the first shard), found through the `.idx`
    files when present, else through the tars' own headers."""
    root = Path(shards_dir)
    tars = shard_files(root, dataset if dataset is not None else load_dataset(root))
    if not tars:
        raise DataError(f"{root}: no shard tar files")
    for loc in locations(tars):
        if key is None or loc.key == key:
            return _read_indexed(loc)
    raise DataError(f"key {key!r} not found in {root} ({len(tars)} shard files searched)")


def decode_video(data: bytes, where: str = "video") -> np.ndarray:
    """All frames of a stored segment: uint8 (T, H, W, 3) RGB."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise DataError(f"{where}: cannot decode the video member ({exc})") from exc
    if not frames:
        raise DataError(f"{where}: the video member holds no frames")
    return np.stack(frames)


def decode_mel(data: bytes, where: str = "mel") -> np.ndarray:
    """The stored log-mel as float32 (N_MELS, mel_frames)."""
    try:
        mel = decode_npy(data)
    except ValueError as exc:
        raise DataError(f"{where}: cannot read the mel member ({exc})") from exc
    return mel.astype(np.float32)


# --- pure: summary and timing ------------------------------------------------------------------


def _fmt_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _table_row(name: str, counts: dict, shards: int) -> str:
    """One line of the sets table, shared by the sets and their total so the columns line up."""
    return (
        f"{name:<16}{counts.get('videos', 0):>8}{counts.get('ok', 0):>8}{counts.get('failed', 0):>8}"
        f"{counts.get('samples', 0):>9}{shards:>8}{counts.get('hours', 0.0):>9.3f}"
        f"{counts.get('bytes', 0) / 1e6:>10.2f}"
    )


def _summary_head(dataset: dict, shards_dir: str | os.PathLike | None) -> list[str]:
    """What the folder is: where, which kind, which classes, and whether labels are multi-label."""
    lines = []
    if shards_dir is not None:
        lines.append(f"shards: {shards_dir}")
    lines.append(
        f"kind: {dataset.get('kind', '?')}   format {dataset.get('format_version', '?')}, "
        f"made by {dataset.get('created_by', '?')}"
    )
    classes = dataset.get("classes") or []
    lines.append(f"classes: {len(classes)}" + (f" ({_fmt_names(classes)})" if classes else ""))
    if dataset.get("multi_label"):
        lines.append("labels: multi-label (each video has a list of classes, in its labels.npy member)")
    return lines


def _summary_sets(dataset: dict) -> list[str]:
    """The table of sets (with their splits), and a total row when there are several sets."""
    sets = dataset.get("sets") or {}
    header = (
        f"{'set':<16}{'videos':>8}{'ok':>8}{'failed':>8}{'samples':>9}{'shards':>8}{'hours':>9}{'MB':>10}"
    )
    lines = ["", header]
    for name, s in sets.items():
        lines.append(_table_row(name, s, len(s.get("shards", []))))
        split = s.get("split") or {}
        if split:
            lines.append(f"{'':<16}" + ", ".join(f"{k}={v}" for k, v in split.items()))
    totals = dataset.get("totals")
    if totals and len(sets) > 1:
        lines.append(_table_row("total", totals, sum(len(s.get("shards", [])) for s in sets.values())))
    return lines


def _summary_failures(dataset: dict) -> list[str]:
    """What did not make it into the shards: failures by reason, then videos missing on disk."""
    failures = dataset.get("failures_by_reason") or {}
    lines = [""]
    if failures:
        lines.append("failures by reason:")
        lines += [
            f"  {reason}: {n}" for reason, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
    else:
        lines.append("failures by reason: none")
    totals = dataset.get("totals")
    if totals and totals.get("missing"):
        lines.append(f"annotated but missing on disk: {totals['missing']}")
    return lines


def _summary_parameters(params: dict) -> list[str]:
    """How the shards were made: shard and layout parameters, sample order, mel settings."""
    lines = []
    shard = params.get("shard") or {}
    if shard:
        lines.append("parameters: " + ", ".join(f"{k}={v}" for k, v in shard.items()))
    layout = {k: params[k] for k in ("shard_size", "max_shard_bytes") if k in params}
    if layout:
        lines.append("layout: " + ", ".join(f"{k}={v}" for k, v in layout.items()))
    if params:
        lines.append(order_line(params.get("shuffle_seed")))
    mel = params.get("mel") or {}
    if mel:
        lines.append(
            f"mel: {mel.get('n_mels')} bands, {mel.get('sample_rate')} Hz, hop {mel.get('hop_length')} "
            f"({mel.get('mel_fps')} frames/s), window {mel.get('window_seconds')} s = "
            f"{mel.get('window_frames')} frames, pad {mel.get('mel_pad_seconds')} s each side"
        )
    return lines


def dataset_summary(dataset: dict, shards_dir: str | os.PathLike | None = None) -> str:
    """The dataset.json summary as text: kind, classes, a table of sets, failures, parameters."""
    lines = _summary_head(dataset, shards_dir) + _summary_sets(dataset) + _summary_failures(dataset)
    lines += _summary_parameters(dataset.get("parameters") or {})
    return "\n".join(lines)


@dataclass(frozen=True)
class Timing:
    """Where a sample sits in its source, in seconds of the source's timeline."""

    mel_start: float  # centre time of stored mel column 0
    mel_step: float  # seconds per mel column
    start: float  # segment (or clip) start
    end: float
    fps: Fraction | None  # None for audio-only samples
    start_frame: int


def order_line(shuffle_seed: int | None) -> str:
    """Name order (older shards, or `--order name`) is class order: worth a warning, not an error."""
    if shuffle_seed is None:
        return "order: by name (class order: training batches mix few classes; reshard to shuffle)"
    return f"order: shuffled (seed {shuffle_seed})"


def sample_timing(info: dict[str, int]) -> Timing:
    """Map stored mel columns and the segment to seconds, per `format.segment_mel_origin`.

    Audio-only samples have no frame rate: their mel column MEL_PAD_FRAMES is time 0.
    """
    step = 1 / fmt.MEL_FPS
    if info["fps_num"] > 0 and info["fps_den"] > 0:
        fps = Fraction(info["fps_num"], info["fps_den"])
        start = info["start_frame"] / fps
        origin = fmt.segment_mel_origin(info["start_frame"], fps)
        return Timing(
            origin * step,
            step,
            float(start),
            float(start + info["num_frames"] / fps),
            fps,
            info["start_frame"],
        )
    span = (info["mel_frames"] - 2 * fmt.MEL_PAD_FRAMES) * step
    return Timing(-fmt.MEL_PAD_FRAMES * step, step, 0.0, max(span, 0.0), None, 0)


def describe_sample(sample: Sample, classes: list[str] | None = None) -> str:
    """Text lines: key, shard, members with sizes, info fields, label."""
    lines = [f"key: {sample.key}", f"shard: {sample.shard}"]
    lines.append("members: " + ", ".join(f"{ext} ({len(data)} B)" for ext, data in sample.members.items()))
    info = sample.info
    if info:
        lines.append("info: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    labels = sample_labels(sample, classes)
    if labels is not None:
        lines.append(f"labels ({len(labels)}): " + ", ".join(labels))
        return "\n".join(lines)
    label = sample_label(sample, classes)
    if label:
        lines.append(f"label: {label}")
    return "\n".join(lines)


def sample_labels(sample: Sample, classes: list[str] | None = None) -> list[str] | None:
    """`Name (index)` of each class of a multi-label sample (its labels.npy member); None otherwise."""
    data = sample.members.get(fmt.LABELS_EXT)
    if data is None:
        return None
    indices = fmt.decode_labels(data).tolist()
    names = sample.meta.get("labels")
    if not isinstance(names, list) or len(names) != len(indices):
        names = [classes[i] if classes and 0 <= i < len(classes) else "?" for i in indices]
    return [f"{name} ({index})" for name, index in zip(names, indices, strict=True)]


def sample_label(sample: Sample, classes: list[str] | None = None) -> str | None:
    """`Name (index)` of a single-label sample, or a multi-label sample's list on one line."""
    labels = sample_labels(sample, classes)
    if labels is not None:
        return ", ".join(labels)
    meta = sample.meta
    index = meta.get("class_index")
    if index is None and fmt.CLS_EXT in sample.members:
        index = int(sample.members[fmt.CLS_EXT])
    name = meta.get("label")
    if name is None and classes and index is not None and 0 <= index < len(classes):
        name = classes[index]
    if name is None and (index is None or index < 0):
        return None
    return f"{name} ({index})" if index is not None and index >= 0 else str(name)


# --- the figure ----------------------------------------------------------------------------------


def _figure_layout(n: int):
    """(Figure, grid, rows, cols) for `n` frames in up to 4 columns above the mel; margins fixed for speed."""
    from matplotlib.figure import Figure

    cols = min(n, 4) if n else 1
    rows = -(-n // cols) if n else 0
    height = 2.0 * rows + 3.2  # inches; fixed margins (constrained layout costs seconds per figure)
    fig = Figure(figsize=(2.6 * max(cols, 4), height))
    spec = fig.add_gridspec(
        rows + 1,
        cols,
        height_ratios=[1.0] * rows + [1.4],
        left=0.07,
        right=0.97,
        top=1 - 0.95 / height,
        bottom=0.55 / height,
        hspace=0.35,
        wspace=0.08,
    )
    return fig, spec, rows, cols


def _draw_frames(fig, spec, frames: np.ndarray, n: int, cols: int, timing: Timing) -> None:
    """`n` frames spread over the segment, titled with frame number and time, to match them to the mel."""
    picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
    for i, f in enumerate(picks):
        ax = fig.add_subplot(spec[i // cols, i % cols])
        ax.imshow(frames[f])
        frame_no = timing.start_frame + int(f)
        t = frame_no / timing.fps if timing.fps else 0.0
        ax.set_title(f"frame {frame_no}  {float(t):.2f} s", fontsize=8)
        ax.set_axis_off()


def _draw_mel(fig, ax, mel: np.ndarray, timing: Timing) -> None:
    """The mel on the source's time axis with the segment marked, so its context padding shows."""
    x0 = timing.mel_start - timing.mel_step / 2
    x1 = x0 + mel.shape[1] * timing.mel_step
    top = float(mel.max()) if mel.size else 0.0
    vmin = max(
        float(mel.min()) if mel.size else fmt.TOP_DB_FLOOR, top - 80.0
    )  # 80 dB of range, not the floor
    extent = (x0, x1, -0.5, mel.shape[0] - 0.5)
    im = ax.imshow(mel, origin="lower", aspect="auto", extent=extent, cmap="magma", vmin=vmin, vmax=top)
    ax.axvspan(timing.start, timing.end, facecolor="none", edgecolor="cyan", linewidth=1.5, label="segment")
    for edge in (timing.start, timing.end):
        ax.axvline(edge, color="cyan", linewidth=1.0, linestyle="--")
    ax.set_xlabel("time in the source (s)")
    ax.set_ylabel("mel band")
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax, label="dB", pad=0.01)


def _figure_title(sample: Sample, info: dict, frames: np.ndarray | None, timing: Timing, classes) -> str:
    """Key, label(s) and where the segment sits in its video, so a picture names what it shows."""
    meta = sample.meta
    labels = sample_labels(sample, classes)
    single = sample_label(sample, classes) or "no label"
    label = f"labels: {_fmt_names(labels, 6)}" if labels else f"label: {single}"
    video = meta.get("video") or {}
    where = f"set {meta['set']}" if "set" in meta else sample.shard.name
    if frames is not None:
        h, w = frames.shape[1:3]
        fps = f"{float(timing.fps):.3g} fps" if timing.fps else "? fps"
        detail = (
            f"segment {info.get('segment', 0) + 1}/{info.get('num_segments', 1)}: frames "
            f"{timing.start_frame}-{timing.start_frame + len(frames) - 1} of {video.get('frames', '?')}, "
            f"{fps}, {w}x{h}, {where}"
        )
    else:
        detail = f"audio only, {timing.end:.2f} s, {where}"
    return f"{sample.key}\n{label}\n{detail}"


def render_sample(sample: Sample, frames: np.ndarray | None, mel: np.ndarray, *, classes=None, grid: int = 8):
    """A matplotlib Figure: up to `grid` frames evenly spread over the segment (none for audio-only),
    and the mel with a time axis in seconds and the segment's extent marked."""
    info = sample.info or {}
    timing = sample_timing(info) if info else Timing(0.0, 1 / fmt.MEL_FPS, 0.0, 0.0, None, 0)
    n = 0 if frames is None else min(grid, len(frames))
    fig, spec, rows, cols = _figure_layout(n)
    if n:
        _draw_frames(fig, spec, frames, n, cols, timing)
    _draw_mel(fig, fig.add_subplot(spec[rows, :]), mel, timing)
    fig.suptitle(_figure_title(sample, info, frames, timing, classes), fontsize=9)
    return fig


def write_png(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save atomically with the Agg backend (no display needed); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def sample_figure(sample: Sample, classes: list[str] | None = None, *, grid: int = 8):
    """Decode a sample's mel and video members and draw them (see `render_sample`)."""
    where = f"{sample.shard}: {sample.key}"
    if fmt.MEL_EXT not in sample.members:
        raise DataError(f"{where}: no {fmt.MEL_EXT} member")
    mel = decode_mel(sample.members[fmt.MEL_EXT], where)
    ext = sample.video_ext
    frames = decode_video(sample.members[ext], where) if ext else None
    return render_sample(sample, frames, mel, classes=classes, grid=grid)
