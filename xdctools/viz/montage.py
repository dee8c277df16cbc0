"""Cluster montages, the paper's Tables 13/14 with pictures: one row per cluster, ranked by purity.

For a clustering result over one shard set (`save_result`: labels per row, index.npy = the shard
"video" index of each row), each shown cluster gets a row: a few members (the middle frame of their
first segment, and that segment's log-mel for audio clusters), the cluster size, and with true labels
in the shards its purity and 5 most frequent classes. Output folder:

  index.html            static page (opens from disk, no external resources), one table row per cluster
  rows/cluster-NNNN.png the member pictures of each shown cluster, side by side
  montage.png           every shown row with its text in one picture (skipped above MAX_MONTAGE_ROWS)
  montage.json          the numbers: ranks, sizes, purities, classes, member video indices and keys

Pure: `rank_rows`, `pick_members`, `split_shown`, `frame_thumb`, `mel_thumb`, `row_image`, `render_html`.
I/O: `read_clusters`, `FirstSegments` (each video's first segment, located and read through
`xdctools.shard.read`: the `.idx` files or the tars' headers; each sample read once), `write_montage`.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from xdctools.cluster.report import purity, rank_clusters
from xdctools.errors import ConfigError, DataError, InputError
from xdctools.features.store import check_new_folder, write_folder
from xdctools.inspect import decode_mel
from xdctools.shard import format as fmt
from xdctools.shard.read import DATASET_FILE, Location, locations, read_dataset_json, read_samples

MODALITIES = ("video", "audio", "both")
PICKS = ("nearest", "random")
MAX_MONTAGE_ROWS = 60  # montage.png holds every shown row up to this many; the page has no limit
GAP = 4  # pixels between member tiles
MEL_DB_RANGE = 80.0  # dB shown below a mel's maximum
_KEY = re.compile(r"^v(\d+)_.*_s(\d+)$")  # fmt.make_key: v{video:08d}_{slug}_s{segment:03d}


@dataclass(frozen=True)
class Clusters:
    """A clustering result folder, read without the centroids."""

    path: Path
    labels: np.ndarray  # (N,) int32 cluster of each row, -1 for dropped rows
    index: np.ndarray  # (N,) int64 shard video index of each row
    distances: np.ndarray | None  # (N,) float32 squared L2 to the centroid, when distances.npy exists
    k: int
    view: str  # the clustered view from stats.json ("video", "audio", "cdc", "array"), "" if unknown


@dataclass(frozen=True)
class Row:
    """One cluster of the table: rank 1 is the purest (the largest when nothing is labelled)."""

    rank: int
    cluster: int
    size: int  # videos in the cluster
    labelled: int  # of them with a known class
    purity: float | None  # None without labelled members
    classes: tuple[tuple[int, float], ...]  # (class, fraction of the labelled members), most frequent first


@dataclass
class ShownVideo:
    """One shown member: where it is and what is drawn of it."""

    row: int
    video: int
    key: str = ""
    label: int = -1
    frame: np.ndarray | None = None  # (H, W, 3) uint8 middle frame of the first segment
    mel: np.ndarray | None = None  # (N_MELS, T) float32 log-mel of the first segment


@dataclass(frozen=True)
class MontageSummary:
    out: Path
    clusters: int  # non-empty clusters
    empty: int
    shown: int
    rows: int  # rows (videos) clustered
    labelled: int
    purity: float | None
    modality: str
    pick: str
    files: tuple[str, ...] = field(default=())


# --- ranking and member choice (pure) ----------------------------------------------------------------


def rank_rows(labels: np.ndarray, truth: np.ndarray | None = None, *, top_classes: int = 5) -> list[Row]:
    """Every non-empty cluster, purest first (`report.rank_clusters`: ties by size, then id).

    Clusters without a labelled member, or every cluster when `truth` is None or all -1, follow in
    order of size (largest first), then id, with purity None.
    """
    labels = np.asarray(labels)
    sizes = np.bincount(labels[labels >= 0])
    rows: list[Row] = []
    if truth is not None:
        for r in rank_clusters(truth, labels, top_classes=top_classes):
            rows.append(Row(0, r.cluster, int(sizes[r.cluster]), r.size, r.purity, r.classes))
    ranked = {r.cluster for r in rows}
    rest = [c for c in np.flatnonzero(sizes) if c not in ranked]
    rest.sort(key=lambda c: (-sizes[c], c))
    rows += [Row(0, int(c), int(sizes[c]), 0, None, ()) for c in rest]
    return [Row(i, r.cluster, r.size, r.labelled, r.purity, r.classes) for i, r in enumerate(rows, start=1)]


def split_shown(rows: Sequence[Row], top: int | None, bottom: int | None) -> tuple[list[Row], list[Row]]:
    """(top rows, bottom rows) to show; all rows in the first list when top/bottom are None or cover all."""
    if top is None or bottom is None or top + bottom >= len(rows):
        return list(rows), []
    return list(rows[:top]), list(rows[len(rows) - bottom :]) if bottom else []


def pick_members(
    labels: np.ndarray,
    clusters: Iterable[int],
    per_cluster: int,
    *,
    distances: np.ndarray | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """cluster -> the rows (int64) to show: the `per_cluster` nearest to the centroid when distances are
    given (ties and NaN by row order), else a uniform draw seeded by (seed, cluster), in row order.

    Each cluster's choice depends only on its own rows, so showing more clusters changes no other row.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    out = {}
    for c in clusters:
        lo, hi = np.searchsorted(sorted_labels, [c, c + 1])
        rows = order[lo:hi].astype(np.int64)
        if distances is not None:
            d = np.asarray(distances, dtype=np.float64)[rows]
            chosen = rows[np.lexsort((rows, np.where(np.isnan(d), np.inf, d)))[:per_cluster]]
        else:
            rng = np.random.default_rng([seed, int(c)])
            chosen = np.sort(rng.choice(rows, size=min(per_cluster, len(rows)), replace=False))
        out[int(c)] = chosen
    return out


# --- pictures (pure) ---------------------------------------------------------------------------------


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    mode = Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), mode, reducing_gap=2.0))


def frame_thumb(frame: np.ndarray, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, W·height/H, 3) uint8, aspect kept."""
    h, w = frame.shape[:2]
    return _resize(np.ascontiguousarray(frame), max(1, round(w * height / h)), height)


def mel_thumb(mel: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N_MELS, T) log-mel -> (height, width, 3) uint8, low frequencies at the bottom, magma over the
    MEL_DB_RANGE dB below its maximum (digital silence would otherwise flatten the picture)."""
    from matplotlib import colormaps

    mel = np.asarray(mel, dtype=np.float32)
    top = float(mel.max()) if mel.size else 0.0
    lo = max(float(mel.min()) if mel.size else top, top - MEL_DB_RANGE)
    scaled = np.clip((mel - lo) / (top - lo), 0, 1) if top > lo else np.zeros_like(mel)
    rgb = (colormaps["magma"](scaled[::-1])[..., :3] * 255).round().astype(np.uint8)
    return _resize(rgb, width, height)


def member_tile(member: ShownVideo, *, height: int, mel_height: int, audio_width: int) -> np.ndarray:
    """The frame above the mel (either may be absent), both as wide as the frame thumbnail: uint8 RGB."""
    parts = []
    width = audio_width
    if member.frame is not None:
        thumb = frame_thumb(member.frame, height)
        width = thumb.shape[1]
        parts.append(thumb)
    if member.mel is not None:
        parts.append(mel_thumb(member.mel, width, mel_height if parts else height))
    if not parts:  # the sample lacks the member asked for: a grey tile keeps the row aligned
        parts.append(np.full((height, width, 3), 200, dtype=np.uint8))
    if len(parts) == 2:
        parts.insert(1, np.full((2, width, 3), 255, dtype=np.uint8))
    return np.concatenate(parts, axis=0)


def row_image(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Tiles side by side, GAP white pixels apart, top-aligned on white: (H, W, 3) uint8."""
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + GAP * (len(tiles) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        out[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + GAP
    return out


def class_name(c: int, names: Sequence[str] | None) -> str:
    return names[c] if names is not None and 0 <= c < len(names) else str(c)


def concepts(row: Row, names: Sequence[str] | None) -> list[str]:
    """'name(0.70)' per top class, as the paper's tables write them."""
    return [f"{class_name(c, names)}({f:.2f})" for c, f in row.classes]


def row_file(cluster: int) -> str:
    return f"rows/cluster-{cluster:04d}.png"


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.classes { max-width: 22em; }
img { display: block; }
.captions { display: flex; gap: 4px; margin-top: 2px; }
.captions span { color: #666; font-size: 0.75em; white-space: nowrap; }
.captions span { overflow: hidden; text-overflow: ellipsis; }
tr.gap td { text-align: center; color: #888; background: #fafafa; }
"""


@dataclass(frozen=True)
class Picture:
    """Pixel size of a row PNG and of each member tile in it, so captions line up under the tiles."""

    width: int
    height: int
    tiles: tuple[int, ...]  # tile widths, GAP pixels apart


def render_html(
    head: Sequence[Row],
    tail: Sequence[Row],
    members: dict[int, list[ShownVideo]],
    pictures: dict[int, Picture],
    *,
    names: Sequence[str] | None,
    title: str,
    meta: Sequence[str],
    hidden: int,
) -> str:
    """The page: one `<tr class="cluster" id="cluster-C">` per shown cluster, images by relative path,
    with width and height given so the layout does not jump while they load."""
    e = html.escape

    def tr(row: Row) -> str:
        pur = "–" if row.purity is None else f"{row.purity:.2f}"
        classes = e(", ".join(concepts(row, names))) or "no labels"
        ms, pic = members.get(row.cluster, []), pictures[row.cluster]
        captions = "".join(
            f'<span style="width:{w}px" title="{e(text)}">{e(text)}</span>'
            for m, w in zip(ms, pic.tiles, strict=True)
            for text in [f"v{m.video}" + (f" {class_name(m.label, names)}" if m.label >= 0 else "")]
        )
        return (
            f'<tr class="cluster" id="cluster-{row.cluster}" data-cluster="{row.cluster}" '
            f'data-rank="{row.rank}">'
            f'<td class="num">{row.rank}</td><td class="num">{row.cluster}</td>'
            f'<td class="num">{row.size}</td><td class="num">{pur}</td><td class="classes">{classes}</td>'
            f'<td><img src="{row_file(row.cluster)}" width="{pic.width}" height="{pic.height}" '
            f'alt="cluster {row.cluster}: {len(ms)} members">'
            f'<div class="captions">{captions}</div></td></tr>'
        )

    body = [tr(r) for r in head]
    if tail:
        body.append(f'<tr class="gap"><td colspan="6">… {hidden} clusters not shown …</td></tr>')
        body += [tr(r) for r in tail]
    meta_html = "<br>".join(e(m) for m in meta)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n"
        '<link rel="icon" href="data:,">\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{e(title)}</h1>\n"
        f'<p class="meta">{meta_html}</p>\n'
        "<table>\n<thead><tr><th>#</th><th>cluster</th><th>size</th><th>purity</th>"
        "<th>top classes (fraction of the cluster)</th><th>members</th></tr></thead>\n"
        "<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n</body>\n</html>\n"
    )


# --- reading (I/O) -----------------------------------------------------------------------------------


def read_clusters(path: str | os.PathLike) -> Clusters:
    """labels.npy and index.npy (required), distances.npy and stats.json (optional) of a result folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    if not (path / "labels.npy").is_file():
        raise DataError(f"{path}: no labels.npy (not a clustering output folder)")
    if not (path / "index.npy").is_file():
        raise DataError(
            f"{path}: no index.npy, so rows cannot be matched to shard videos "
            "(cluster a feature store, or set ClusterResult.index before save_result)"
        )
    try:
        labels = np.load(path / "labels.npy", allow_pickle=False)
        index = np.load(path / "index.npy", allow_pickle=False)
        dist_path = path / "distances.npy"
        distances = np.load(dist_path, allow_pickle=False) if dist_path.is_file() else None
        stats = json.loads((path / "stats.json").read_text()) if (path / "stats.json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable clustering output ({exc})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or index.shape != labels.shape:
        raise DataError(
            f"{path}: labels.npy {labels.dtype} {labels.shape} and index.npy {index.shape} "
            "must be aligned 1-D integer arrays"
        )
    if distances is not None and distances.shape != labels.shape:
        raise DataError(f"{path}: distances.npy {distances.shape} does not match labels.npy {labels.shape}")
    k = int(stats.get("k") or (labels.max() + 1 if labels.size else 0))
    return Clusters(
        path, labels.astype(np.int64), index.astype(np.int64), distances, k, stats.get("view", "")
    )


def _read_all(locs: Sequence[Location], exts: Sequence[str]) -> list[dict[str, bytes]]:
    """The `exts` members of each sample (absent ones skipped), one open per tar, reads in file order."""
    first = [min(loc.members.values(), default=(0, 0)) for loc in locs]
    order = sorted(range(len(locs)), key=lambda i: (locs[i].tar, first[i]))
    out: list[dict[str, bytes]] = [{} for _ in locs]
    for i, sample in zip(order, read_samples([locs[i] for i in order], exts), strict=True):
        out[i] = sample.members
    return out


class FirstSegments:
    """One shard set: where each video's first segment is, found from the `.idx` files (or tar headers).

    `shards` is a shard folder (with dataset.json; `set_name` picks a set when it holds several) or a
    set folder of tars. Video indices are per set (INFO_FIELDS "video").
    """

    def __init__(self, shards: str | os.PathLike, set_name: str | None = None) -> None:
        root = Path(shards)
        if not root.is_dir():
            raise InputError(f"{root}: not a folder")
        dataset = read_dataset_json(root)
        if dataset is not None:
            sets = dataset.get("sets") or {}
            if set_name is None:
                if len(sets) != 1:
                    names = ", ".join(sets) or "none"
                    raise InputError(f"{root}: holds shard sets {names}; pick one with --set")
                set_name = next(iter(sets))
            if set_name not in sets:
                raise InputError(f"{root}: no shard set {set_name!r} (sets: {', '.join(sets) or 'none'})")
            listed = [root / s["tar"] for s in sets[set_name].get("shards", []) if "tar" in s]
            self.tars = listed or sorted((root / set_name).glob("*.tar"))
        elif any(root.glob("*.tar")):
            dataset = read_dataset_json(root.parent) or {}
            set_name = root.name
            self.tars = sorted(root.glob("*.tar"))
        else:
            raise InputError(f"{root}: no {DATASET_FILE} and no shard .tar files")
        self.classes: list[str] | None = dataset.get("classes")  # checked by read_dataset_json
        self.root, self.name = root, set_name
        if not self.tars:
            raise DataError(f"{root}: shard set {set_name!r} has no tar files")
        self.first = self._first_segments()

    def _first_segments(self) -> dict[int, Location]:
        best: dict[int, tuple[int, Location]] = {}
        unnamed: list[Location] = []
        for loc in locations(self.tars):
            m = _KEY.match(loc.key)
            if m is None:
                unnamed.append(loc)
                continue
            video, segment = int(m.group(1)), int(m.group(2))
            if video not in best or segment < best[video][0]:
                best[video] = (segment, loc)
        for loc, data in zip(unnamed, _read_all(unnamed, [fmt.INFO_EXT]), strict=True):
            if fmt.INFO_EXT not in data:
                raise DataError(f"{loc.tar}: sample {loc.key} has no {fmt.INFO_EXT}")
            info = fmt.decode_info(data[fmt.INFO_EXT])
            if info["video"] not in best or info["segment"] < best[info["video"]][0]:
                best[info["video"]] = (info["segment"], loc)
        return {video: loc for video, (_, loc) in best.items()}

    def locate(self, videos: Sequence[int]) -> list[Location]:
        missing = [int(v) for v in videos if int(v) not in self.first]
        if missing:
            raise DataError(
                f"{len(missing)} clustered videos (e.g. {', '.join(map(str, missing[:5]))}) are not in "
                f"shard set {self.name!r} of {self.root} (clustered from another set?)"
            )
        return [self.first[int(v)] for v in videos]

    def labels(self, videos: np.ndarray) -> np.ndarray:
        """(N,) int64 true class of each video (-1 unknown), from its first segment's info.npy."""
        uniq, inverse = np.unique(videos, return_inverse=True)
        locs = self.locate(uniq.tolist())
        found = np.full(len(uniq), -1, dtype=np.int64)
        for i, data in enumerate(_read_all(locs, [fmt.INFO_EXT])):
            if fmt.INFO_EXT in data:
                found[i] = fmt.decode_info(data[fmt.INFO_EXT])["label"]
        return found[inverse]

    def fill(self, members: Sequence[ShownVideo], *, frames: bool, mel: bool) -> None:
        """Read each member's first segment once; decode its middle frame and/or its mel."""
        locs = self.locate([m.video for m in members])
        exts = (
            [fmt.INFO_EXT]
            + ([fmt.MEL_EXT] if mel else [])
            + (list(fmt.VIDEO_EXTS.values()) if frames else [])
        )
        for member, loc, data in zip(members, locs, _read_all(locs, exts), strict=True):
            where = f"{loc.tar}: {loc.key}"
            member.key = loc.key
            info = fmt.decode_info(data[fmt.INFO_EXT]) if fmt.INFO_EXT in data else {}
            member.label = info.get("label", -1)
            video = next((data[e] for e in fmt.VIDEO_EXTS.values() if e in data), None)
            if frames and video is not None:
                member.frame = middle_frame(video, info.get("num_frames", 0), where)
            if mel and fmt.MEL_EXT in data:
                member.mel = unpadded_mel(decode_mel(data[fmt.MEL_EXT], where))


def middle_frame(data: bytes, num_frames: int, where: str) -> np.ndarray:
    """Frame num_frames // 2 of an encoded segment as (H, W, 3) uint8 RGB, decoding no further."""
    import av

    target = max(0, num_frames // 2)
    frame = None
    try:
        with av.open(io.BytesIO(data)) as container:
            for i, f in enumerate(container.decode(video=0)):
                frame = f
                if i >= target:
                    break
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise DataError(f"{where}: cannot decode the video member ({exc})") from None
    if frame is None:
        raise DataError(f"{where}: the video member holds no frames")
    return frame.to_ndarray(format="rgb24")


def unpadded_mel(mel: np.ndarray) -> np.ndarray:
    """The stored mel without the MEL_PAD_FRAMES of context on each side: the segment's own audio."""
    pad = fmt.MEL_PAD_FRAMES
    return mel[:, pad:-pad] if mel.shape[1] > 2 * pad else mel


# --- writing (I/O) -----------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _montage_png(
    rows: Sequence[Row], gap_after: int | None, images: dict[int, np.ndarray], names: Sequence[str] | None
) -> bytes:
    """All shown rows in one picture: the text of a row at the left, its member pictures at the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    text_w, pad, line_h, gap_h = 300, 10, 14, 26
    blocks = []
    for row in rows:
        pur = "–" if row.purity is None else f"{row.purity:.2f}"
        lines = [f"#{row.rank}  cluster {row.cluster}  size {row.size}  purity {pur}"]
        text = ", ".join(concepts(row, names))
        lines += textwrap.wrap(text, 44, break_on_hyphens=False) or ["no labels"]
        img = images[row.cluster]
        blocks.append((lines, img, max(img.shape[0], line_h * len(lines)) + pad))
    width = text_w + max(img.shape[1] for _, img, _ in blocks) + 2 * pad
    height = sum(h for *_, h in blocks) + pad + (gap_h if gap_after is not None else 0)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    texts, y = [], pad
    for i, (lines, img, h) in enumerate(blocks):
        canvas[y : y + img.shape[0], text_w + pad : text_w + pad + img.shape[1]] = img
        texts.append((pad, y, lines))
        y += h
        if gap_after is not None and i == gap_after:
            texts.append((text_w // 2, y + 2, ["…"]))
            y += gap_h
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    for x, ty, lines in texts:
        for j, line in enumerate(lines):
            fig.text(
                x / width,
                1 - (ty + j * line_h) / height,
                line,
                va="top",
                fontsize=8.5,
                fontweight="bold" if j == 0 and len(lines) > 1 else "normal",
            )
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _resolve_modality(modality: str | None, view: str) -> str:
    if modality is None:
        return "video" if view == "video" else "both"
    if modality not in MODALITIES:
        raise ConfigError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return modality


_SHOWING = {
    "video": "middle frame of the first segment",
    "audio": "log-mel of the first segment",
    "both": "middle frame and log-mel of the first segment",
}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative name -> bytes) under `folder`, making subfolders as needed."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _check_options(pick: str, per_cluster: int, height: int) -> None:
    """Reject bad options before anything is read, so a typo costs no shard reading."""
    if pick not in PICKS:
        raise ConfigError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")
    if per_cluster < 1 or height < 16:
        raise ConfigError(f"--per-cluster must be >= 1 and --height >= 16 (got {per_cluster}, {height})")


def _shown_members(
    result: Clusters,
    shards: FirstSegments,
    shown: Sequence[Row],
    per_cluster: int,
    *,
    distances: np.ndarray | None,
    seed: int,
    modality: str,
) -> dict[int, list[ShownVideo]]:
    """cluster -> its shown members, each first segment read once; DataError if none has what is drawn."""
    chosen = pick_members(
        result.labels, [r.cluster for r in shown], per_cluster, distances=distances, seed=seed
    )
    members = {c: [ShownVideo(int(i), int(result.index[i])) for i in idx] for c, idx in chosen.items()}
    flat = [m for ms in members.values() for m in ms]
    shards.fill(flat, frames=modality != "audio", mel=modality != "video")
    if not any(m.frame is not None or m.mel is not None for m in flat):
        what = "video" if modality == "video" else "mel"
        raise DataError(f"{shards.root}: the shown members have no {what} member (try another --modality)")
    return members


def _row_pictures(
    members: dict[int, list[ShownVideo]], height: int
) -> tuple[dict[int, np.ndarray], dict[int, Picture]]:
    """cluster -> its row image, and -> that image's Picture, which the page needs to place captions."""
    size = {"height": height, "mel_height": max(16, height // 2), "audio_width": 2 * height}
    tiles = {c: [member_tile(m, **size) for m in ms] for c, ms in members.items()}
    images = {c: row_image(t) for c, t in tiles.items()}
    pictures = {
        c: Picture(img.shape[1], img.shape[0], tuple(t.shape[1] for t in tiles[c]))
        for c, img in images.items()
    }
    return images, pictures


def _page_meta(
    summary: MontageSummary, result: Clusters, shards: FirstSegments, per_cluster: int, seed: int
) -> list[str]:
    """The page's header lines, so the page says on its own what was clustered, shown, and ranked how."""
    how = "nearest to the centroid" if summary.pick == "nearest" else f"drawn at random (seed {seed})"
    ranking = (
        f"ranked by purity against the shards' labels ({summary.labelled} labelled videos, "
        f"overall purity {summary.purity:.3f})"
        if summary.purity is not None
        else "no true labels in the shards: ranked by size"
    )
    return [
        f"clusters: {result.path} (view {result.view or '?'}, k={result.k}, {summary.rows} videos)",
        f"shards: {shards.root}, set {shards.name}; showing the {_SHOWING[summary.modality]}",
        f"{summary.shown} of {summary.clusters} non-empty clusters shown; members: up to {per_cluster} {how}",
        ranking,
    ]


def _montage_numbers(
    summary: MontageSummary,
    result: Clusters,
    shards: FirstSegments,
    seed: int,
    shown: Sequence[Row],
    members: dict[int, list[ShownVideo]],
) -> dict:
    """montage.json: summary, inputs and shown rows with their members, so nobody has to parse the page."""
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(summary).items() if k != "files"},
        "clusters_dir": str(result.path),
        "shards": str(shards.root),
        "set": shards.name,
        "seed": seed,
        "k": result.k,
        "class_names": shards.classes,
        "hidden": summary.clusters - summary.shown,
        "shown_rows": [
            {
                **asdict(r),
                "classes": [[c, f] for c, f in r.classes],
                "members": [{"video": m.video, "key": m.key, "label": m.label} for m in members[r.cluster]],
                "image": row_file(r.cluster),
            }
            for r in shown
        ],
    }


def _montage_files(
    images: dict[int, np.ndarray],
    head: Sequence[Row],
    tail: Sequence[Row],
    names: Sequence[str] | None,
    numbers: dict,
    page: str,
) -> dict[str, bytes]:
    """Every output file's bytes by name, made before writing so the folder appears whole or not at all."""
    shown = [*head, *tail]
    files = {row_file(c): _png_bytes(img) for c, img in images.items()}
    if len(shown) <= MAX_MONTAGE_ROWS:
        files["montage.png"] = _montage_png(shown, len(head) - 1 if tail else None, images, names)
    files["montage.json"] = (json.dumps(numbers, indent=1) + "\n").encode()
    files["index.html"] = page.encode("utf-8")
    return files


def write_montage(
    clusters_dir: str | os.PathLike,
    shards_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modality: str | None = None,
    top: int | None = 10,
    bottom: int | None = 10,
    per_cluster: int = 6,
    pick: str = "nearest",
    seed: int = 0,
    set_name: str | None = None,
    height: int = 96,
    overwrite: bool = False,
) -> MontageSummary:
    """Build the montage folder `out` (module docstring), atomically: a temp folder renamed into place.

    modality: "video" (frames), "audio" (mels), "both"; None: frames for video clusters, both otherwise.
    top/bottom: how many of the purest and least pure clusters to show (None: all). pick: the members
    "nearest" to the centroid (a seeded draw when there is no distances.npy) or "random" (seeded).
    height: pixels of a member's frame (its mel is half as high).
    """
    _check_options(pick, per_cluster, height)
    out = Path(out)
    check_new_folder(out, overwrite)
    result = read_clusters(clusters_dir)
    shards = FirstSegments(shards_dir, set_name)
    modality = _resolve_modality(modality, result.view)

    # True labels of every clustered video (first segment's info.npy), the ranking, the rows shown.
    kept = result.labels >= 0
    truth = shards.labels(result.index)
    labelled = int(((truth >= 0) & kept).sum())
    rows = rank_rows(result.labels, truth if labelled else None)
    if not rows:
        raise DataError(f"{result.path}: every row is unassigned (label -1): nothing to show")
    head, tail = split_shown(rows, top, bottom)
    shown = head + tail

    # Members: nearest to the centroid (or a seeded draw); each member's first segment read once.
    distances = result.distances if pick == "nearest" else None
    members = _shown_members(
        result, shards, shown, per_cluster, distances=distances, seed=seed, modality=modality
    )

    # Pictures, page and numbers.
    images, pictures = _row_pictures(members, height)
    summary = MontageSummary(
        out=out,
        clusters=len(rows),
        empty=max(0, result.k - len(rows)),
        shown=len(shown),
        rows=int(kept.sum()),
        labelled=labelled,
        purity=purity(truth, result.labels) if labelled else None,
        modality=modality,
        pick="nearest" if distances is not None else "random",
    )
    meta = _page_meta(summary, result, shards, per_cluster, seed)
    title = f"Clusters of {result.path.name}"
    hidden = len(rows) - len(shown)
    page = render_html(
        head, tail, members, pictures, names=shards.classes, title=title, meta=meta, hidden=hidden
    )
    numbers = _montage_numbers(summary, result, shards, seed, shown, members)

    # Everything goes to disk at once, under a temporary name renamed into place.
    files = _montage_files(images, head, tail, shards.classes, numbers, page)
    write_folder(out, lambda tmp: _write_files(tmp, files), overwrite=overwrite)
    return replace(summary, files=tuple(sorted(files)))
