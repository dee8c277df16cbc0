"""Conv1 filter sheets of R(2+1)D checkpoints, laid out like the paper's Figure 2, side by side to compare.

R(2+1)D factors the 3×7×7 conv1 into `stem.0` (3 → M channels, 1×7×7: the spatial filters, M = 45 at
width 1) and `stem.3` (M → C channels, 3×1×1: the temporal filters, C = 64). A spatial filter is drawn as
a 7×7 RGB tile; a temporal filter as an M×3 heat map, one row per spatial filter it combines and one
column per frame (red positive, blue negative), so a motion filter shows as a row changing sign over time.

Pure: `find_stem` (where the stem is inside any checkpoint), `spatial_tiles`, `temporal_tiles`
(normalisation and grid layout), `compose_sheet` (the whole picture as pixels plus text placements).
I/O: `read_stem` (torch.load, weights_only) and `write_sheet` (PNG through matplotlib, pixels unresampled).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xdctools.errors import ConfigError, DataError

SPATIAL_KEY = "stem.0.weight"
TEMPORAL_KEY = "stem.3.weight"
NORMS = ("filter", "shared")
BACKGROUND = (1.0, 1.0, 1.0)  # white: the sheet, and separators of the spatial grid
SEPARATOR = (0.62, 0.62, 0.62)  # grey: frames the temporal tiles, whose zero is white
MAX_DEPTH = 6  # how deep `find_stem` looks into nested containers
TIME_CELL = 3  # grid pixels per frame of a temporal filter, so an M×3 tile is not a sliver

# Sheet geometry, in pixels of the written PNG (written at DPI, so 1 pt of text = DPI / 72 pixels).
DPI = 100
MARGIN = 16
BLOCK_GAP = 40
MIN_BLOCK_WIDTH = 380
TITLE_Y = MARGIN  # checkpoint label
INFO_Y = TITLE_Y + 22  # layout and filter counts
SPATIAL_CAPTION_Y = INFO_Y + 22
SPATIAL_Y = SPATIAL_CAPTION_Y + 18
CAPTION_GAP = 14  # between a panel and the next caption
PANEL_GAP = 18  # between a caption and its panel
FOOTER_HEIGHT = 30


@dataclass(frozen=True)
class Stem:
    """The two conv1 weights of one checkpoint, as float32 numpy arrays."""

    spatial: np.ndarray  # (M, 3, kh, kw): stem.0 without its singleton time axis
    temporal: np.ndarray  # (C, M, kt): stem.3 without its singleton space axes
    where: str  # key prefix of the stem inside the checkpoint, e.g. "state.video" ("" at top level)
    layout: str | None  # "torchvision" or "xdc" when the rest of the network is there to tell


@dataclass(frozen=True)
class Text:
    x: float  # pixels from the left
    y: float  # pixels from the top (text hangs below it)
    text: str
    size: float = 9.0  # points
    bold: bool = False
    ha: str = "center"


@dataclass(frozen=True)
class Panel:
    """Where a tile grid sits in the sheet, so a reader can find tile i (tests do)."""

    block: int  # which checkpoint
    kind: str  # "spatial" or "temporal"
    x: int  # top-left pixel of the grid
    y: int
    scale: int  # sheet pixels per grid pixel
    rows: int
    cols: int
    tile_h: int  # grid pixels of one tile (a separator of 1 grid pixel follows each)
    tile_w: int

    def tile_box(self, i: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) sheet pixels of tile i (row-major), bottom/right exclusive."""
        r, c = divmod(i, self.cols)
        top = self.y + r * (self.tile_h + 1) * self.scale
        left = self.x + c * (self.tile_w + 1) * self.scale
        return top, left, top + self.tile_h * self.scale, left + self.tile_w * self.scale


@dataclass(frozen=True)
class Sheet:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    texts: tuple[Text, ...]
    panels: tuple[Panel, ...]


# --- finding the stem (pure) ----------------------------------------------------------------------


def _mappings(obj: Any, where: str, depth: int) -> Iterator[tuple[str, Mapping]]:
    """Every mapping inside nested dicts/lists/tuples, with its dotted path."""
    if isinstance(obj, Mapping):
        yield where, obj
        items: Iterator[tuple[Any, Any]] = iter(obj.items())
    elif isinstance(obj, list | tuple):
        items = iter(enumerate(obj))
    else:
        return
    if depth <= 0:
        return
    for key, value in items:
        if isinstance(value, Mapping | list | tuple):
            yield from _mappings(value, f"{where}.{key}" if where else str(key), depth - 1)


def _stem_shapes_ok(spatial: Any, temporal: Any) -> bool:
    return (
        spatial.ndim == 5
        and spatial.shape[1] == 3
        and spatial.shape[2] == 1
        and temporal.ndim == 5
        and temporal.shape[1] == spatial.shape[0]
        and tuple(temporal.shape[3:]) == (1, 1)
    )


def _layout_of(mapping: Mapping, prefix: str) -> str | None:
    from trainer.models.weights import detect_layout

    sub = {k[len(prefix) :]: v for k, v in mapping.items() if isinstance(k, str) and k.startswith(prefix)}
    try:
        return detect_layout(sub)
    except DataError:
        return None


def find_stem(obj: Any, *, source: str = "checkpoint") -> Stem:
    """The R(2+1)D stem inside a loaded checkpoint: a plain state dict, containers such as
    {"state_dict": ...} / {"model": ...} / {"state": {"video": ...}}, DDP or compile prefixes.

    Keys ending in `stem.0.weight` and `stem.3.weight` with one prefix and stem shapes are looked for
    in every nested mapping; a stem whose path names "video" wins over others, then the first found.
    """
    import torch

    found: list[tuple[str, Mapping, str]] = []
    odd: list[str] = []
    tensors = 0
    for where, mapping in _mappings(obj, "", MAX_DEPTH):
        for key, value in mapping.items():
            if not isinstance(value, torch.Tensor):
                continue
            tensors += 1
            if not isinstance(key, str) or not (key == SPATIAL_KEY or key.endswith("." + SPATIAL_KEY)):
                continue
            prefix = key[: -len(SPATIAL_KEY)]
            temporal = mapping.get(prefix + TEMPORAL_KEY)
            name = f"{where}.{key}" if where else key
            if not isinstance(temporal, torch.Tensor):
                odd.append(f"{name} without {prefix}{TEMPORAL_KEY}")
            elif not _stem_shapes_ok(value, temporal):
                odd.append(f"{name} {list(value.shape)} with {TEMPORAL_KEY} {list(temporal.shape)}")
            else:
                path = ".".join(p for p in (where, prefix.rstrip(".")) if p)
                found.append((path, mapping, prefix))
    if not found:
        if odd:
            detail = "; ".join(odd[:3])
        elif tensors:
            detail = f"{tensors} tensors, none named *{SPATIAL_KEY}"
        else:
            detail = "it holds no tensors"
        raise DataError(
            f"{source}: no R(2+1)D stem (need {SPATIAL_KEY} [M, 3, 1, k, k] and "
            f"{TEMPORAL_KEY} [C, M, t, 1, 1]): {detail}"
        )
    path, mapping, prefix = next((f for f in found if "video" in f[0].lower()), found[0])
    spatial = mapping[prefix + SPATIAL_KEY].detach().to("cpu", torch.float32).numpy()[:, :, 0]
    temporal = mapping[prefix + TEMPORAL_KEY].detach().to("cpu", torch.float32).numpy()[:, :, :, 0, 0]
    return Stem(spatial=spatial, temporal=temporal, where=path, layout=_layout_of(mapping, prefix))


# --- normalisation and tile grids (pure) -----------------------------------------------------------


def grid_shape(n: int, aspect: float) -> tuple[int, int]:
    """(rows, cols) holding n tiles, about `aspect` times as many columns as rows: 45 -> 5×9 at 1.8."""
    cols = max(1, min(n, math.ceil(math.sqrt(n * aspect))))
    return math.ceil(n / cols), cols


def _tile_grid(tiles: np.ndarray, cols: int) -> np.ndarray:
    """(n, h, w, ...) tiles -> one (rows·(h+1)-1, cols·(w+1)-1, ...) array, NaN between and after tiles."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *tiles.shape[3:]), np.nan, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return out


def spatial_tiles(weight: np.ndarray, *, shared: bool = False, cols: int | None = None) -> np.ndarray:
    """(M, 3, kh, kw) or (M, 3, 1, kh, kw) spatial filters -> (H, W, 3) float32 RGB grid in [0, 1].

    Filter i is tile i in row-major order, one NaN pixel between tiles (NaN also fills unused cells).
    Each filter is stretched min→0, max→1 over its own values, or with `shared` over all filters, so
    shared keeps their relative strength; a constant filter is mid grey. Channels are the input's RGB.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim == 5 and w.shape[2] == 1:
        w = w[:, :, 0]
    if w.ndim != 4 or w.shape[1] != 3:
        raise DataError(f"spatial filters must be (M, 3, kh, kw), got {list(w.shape)}")
    axes = (0, 1, 2, 3) if shared else (1, 2, 3)
    lo, hi = w.min(axis=axes, keepdims=True), w.max(axis=axes, keepdims=True)
    span = hi - lo
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    cols = cols or grid_shape(len(w), 1.8)[1]
    return _tile_grid(norm.transpose(0, 2, 3, 1), cols)


def temporal_tiles(
    weight: np.ndarray, *, shared: bool = False, cols: int | None = None, time_cell: int = TIME_CELL
) -> np.ndarray:
    """(C, M, kt) or (C, M, kt, 1, 1) temporal filters -> (H, W) float32 grid in [-1, 1].

    Filter j is tile j (row-major): M rows (the spatial filters it combines) by kt frames, each frame
    `time_cell` pixels wide so the tile is not a sliver; NaN between tiles and in unused cells. Each
    filter is divided by its largest |weight| (or, with `shared`, by the largest of all), so 0 stays 0.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim == 5 and w.shape[3:] == (1, 1):
        w = w[:, :, :, 0, 0]
    if w.ndim != 3:
        raise DataError(f"temporal filters must be (C, M, kt), got {list(w.shape)}")
    top = np.abs(w).max(axis=(0, 1, 2) if shared else (1, 2), keepdims=True)
    norm = np.where(top > 0, w / np.where(top > 0, top, 1), 0.0)
    norm = np.repeat(norm, time_cell, axis=2)
    cols = cols or grid_shape(len(w), 4.0)[1]
    return _tile_grid(norm, cols)


def _upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _colour_temporal(grid: np.ndarray) -> np.ndarray:
    """[-1, 1] heat map -> RGB with a diverging map (blue −, white 0, red +); NaN -> grey separator."""
    from matplotlib import colormaps

    rgb = colormaps["RdBu_r"]((np.nan_to_num(grid) + 1) / 2)[..., :3].astype(np.float32)
    rgb[np.isnan(grid)] = SEPARATOR
    return rgb


def default_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File names, or parent/name where two checkpoints share a name (it003-ep010.pt of two runs)."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    longer = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
    return longer if len(set(longer)) == len(longer) else [str(p) for p in paths]


def compose_sheet(
    stems: Sequence[Stem], labels: Sequence[str], *, shared: bool = False, scale: int = 6
) -> Sheet:
    """One column block per checkpoint: label, spatial grid above the temporal grid; pixels + texts.

    The spatial grid is drawn `scale` sheet pixels per filter pixel; the temporal grid gets the largest
    integer scale that keeps it no wider than the spatial one. Nothing is resampled afterwards.
    """
    if len(stems) != len(labels) or not stems:
        raise ValueError(f"compose_sheet: {len(stems)} stems and {len(labels)} labels")
    blocks, texts, panels = [], [], []
    x = MARGIN
    for b, (stem, label) in enumerate(zip(stems, labels, strict=True)):
        m, _, kh, kw = stem.spatial.shape
        c, _, kt = stem.temporal.shape
        s_rows, s_cols = grid_shape(m, 1.8)
        t_rows, t_cols = grid_shape(c, 4.0)
        spatial = _upscale(spatial_tiles(stem.spatial, shared=shared, cols=s_cols), scale)
        spatial = np.where(np.isnan(spatial), np.float32(1.0), spatial)
        t_grid = np.pad(temporal_tiles(stem.temporal, shared=shared, cols=t_cols), 1, constant_values=np.nan)
        t_scale = max(1, spatial.shape[1] // t_grid.shape[1])
        temporal = _colour_temporal(_upscale(t_grid, t_scale))
        width = max(spatial.shape[1], temporal.shape[1], MIN_BLOCK_WIDTH)
        temporal_caption_y = SPATIAL_Y + spatial.shape[0] + CAPTION_GAP
        temporal_y = temporal_caption_y + PANEL_GAP
        height = temporal_y + temporal.shape[0]
        sx = x + (width - spatial.shape[1]) // 2
        tx = x + (width - temporal.shape[1]) // 2
        blocks.append((spatial, sx, SPATIAL_Y, temporal, tx, temporal_y, height))
        centre = x + width / 2
        layout = f"{stem.layout} layout" if stem.layout else "layout unknown"
        texts += [
            Text(centre, TITLE_Y, label, size=12, bold=True),
            Text(centre, INFO_Y, f"{layout}, stem at {stem.where or 'top level'}", size=8.5),
            Text(centre, SPATIAL_CAPTION_Y, f"{m} spatial filters, 3×{kh}×{kw} (RGB)", size=9),
            Text(
                centre,
                temporal_caption_y,
                f"{c} temporal filters, {m} inputs × {kt} frames (red +, blue −)",
                size=9,
            ),
        ]
        panels += [
            Panel(b, "spatial", sx, SPATIAL_Y, scale, s_rows, s_cols, kh, kw),
            Panel(
                b, "temporal", tx + t_scale, temporal_y + t_scale, t_scale, t_rows, t_cols, m, kt * TIME_CELL
            ),
        ]
        x += width + BLOCK_GAP
    width = x - BLOCK_GAP + MARGIN
    height = max(block[-1] for block in blocks) + FOOTER_HEIGHT
    image = np.ones((height, width, 3), dtype=np.float32)
    for spatial, sx, sy, temporal, tx, ty, _ in blocks:
        image[sy : sy + spatial.shape[0], sx : sx + spatial.shape[1]] = spatial
        image[ty : ty + temporal.shape[0], tx : tx + temporal.shape[1]] = temporal
    norm = (
        "shared range per checkpoint (relative strengths kept)"
        if shared
        else "each filter stretched to its own range"
    )
    texts.append(Text(MARGIN, height - FOOTER_HEIGHT + 10, f"normalisation: {norm}", size=8, ha="left"))
    return Sheet(image=image, texts=tuple(texts), panels=tuple(panels))


# --- I/O ----------------------------------------------------------------------------------------


def read_stem(path: str | os.PathLike) -> Stem:
    """Load a checkpoint on the CPU with weights_only=True (no pickled code runs) and find its stem."""
    from trainer.models.weights import read_payload

    path = Path(path)
    return find_stem(read_payload(path), source=str(path))


def write_sheet(sheet: Sheet, path: str | os.PathLike) -> Path:
    """The sheet as a PNG of exactly its pixel size (figimage: no resampling), text drawn on top."""
    from matplotlib.figure import Figure

    from xdctools.inspect import write_png

    h, w = sheet.image.shape[:2]
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    fig.figimage(sheet.image, xo=0, yo=0, origin="upper")
    for t in sheet.texts:
        fig.text(
            t.x / w,
            1 - t.y / h,
            t.text,
            ha=t.ha,
            va="top",
            fontsize=t.size,
            fontweight="bold" if t.bold else "normal",
        )
    return write_png(fig, path, dpi=DPI)


def filter_sheet(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    shared: bool = False,
    scale: int = 6,
) -> tuple[list[Stem], Sheet]:
    """Read every checkpoint's stem and write the side-by-side PNG to `out`; returns what was drawn."""
    if labels is not None and len(labels) != len(checkpoints):
        raise ConfigError(f"--label: {len(labels)} labels for {len(checkpoints)} checkpoints, give one each")
    stems = [read_stem(p) for p in checkpoints]
    sheet = compose_sheet(stems, list(labels or default_labels(checkpoints)), shared=shared, scale=scale)
    write_sheet(sheet, out)
    return stems, sheet
