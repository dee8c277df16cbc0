"""The feature store: a Zarr v3 group of per-modality N×d feature arrays, written and read chunk by chunk.

Layout of `feats.zarr` (the only module that touches Zarr):

  video    (N, d_video) float16, chunks (chunk_rows, d_video), uncompressed: features barely compress
  audio    (N, d_audio) float16, same row chunking (a store may hold one modality or both)
  index    (N,) int64: the shard "video" index (INFO_FIELDS) of each row, -1 until written
  written  (N,) uint8: 1 once every array of that row is written; the resume marker

All arrays share one row chunking (`chunk_rows`, chosen so a feature chunk is at least 1 MiB), so a
chunk-aligned row range maps to whole chunk files in every array. Zarr writes each chunk file to a
temporary name and renames it, and `written` is set only after the features and the index, so an
interrupted write leaves those rows unmarked and `missing_rows()` lists them for the rerun. Several
processes may write at once when each writes whole chunks that no other writes: `rank_rows` gives each
rank a chunk-aligned range and `RowWriter` turns batches of any size into whole-chunk writes.

Group attributes: `format`, `version`, `n`, `dims`, `dtype`, `chunk_rows`, `created`, plus the caller's
`attrs` (by convention `checkpoint` digest, `iteration`, `params` of the extraction).

A store is built in a temporary folder and renamed into place; `write_folder` does the same for the
output folders of later stages (k-means results, montages).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from xdctools.errors import ConfigError, DataError, InputError, naming

FORMAT = "xdctools-features"
VERSION = 1
MODALITIES = ("video", "audio")
CHUNK_BYTES = 1 << 20  # a feature chunk holds at least this many bytes
INDEX, WRITTEN = "index", "written"
_RESERVED = frozenset({"format", "version", "n", "dims", "dtype", "chunk_rows", "created"})


def chunk_rows_for(n: int, dims: Mapping[str, int], dtype: str | np.dtype) -> int:
    """Rows per chunk: a power of two making the narrowest feature chunk >= CHUNK_BYTES, at most n."""
    row_bytes = min(dims.values()) * np.dtype(dtype).itemsize
    rows = 1 << max(0, math.ceil(math.log2(math.ceil(CHUNK_BYTES / row_bytes))))
    return max(1, min(rows, n))


@dataclass(frozen=True)
class FeatureStore:
    """An opened store; cheap to pickle as a path and reopen in each worker process."""

    path: Path
    group: zarr.Group
    n: int
    dims: dict[str, int]
    dtype: np.dtype
    chunk_rows: int
    attrs: dict[str, Any]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.dims)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n)

    def rank_rows(self, rank: int, world: int) -> tuple[int, int]:
        """Row range [start, stop) of one of `world` writers: whole chunks, contiguous, disjoint."""
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, {world})")
        lo, hi = rank * self.num_chunks // world, (rank + 1) * self.num_chunks // world
        return min(lo * self.chunk_rows, self.n), min(hi * self.chunk_rows, self.n)

    def read(self, modality: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one modality in the stored dtype, shape (stop - start, d)."""
        if modality not in self.dims:
            raise ConfigError(f"{self.path}: no '{modality}' features (has {', '.join(self.modalities)})")
        return self.group[modality][start:stop]

    def read_index(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group[INDEX][start : self.n if stop is None else stop]

    def iter_chunks(
        self, modality: str, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row offset, rows) one chunk at a time over [start, stop); memory is one chunk."""
        stop = self.n if stop is None else stop
        pos = start
        while pos < stop:
            end = min((pos // self.chunk_rows + 1) * self.chunk_rows, stop)
            yield pos, self.read(modality, pos, end)
            pos = end

    def written_mask(self) -> np.ndarray:
        return self.group[WRITTEN][:].astype(bool)

    def missing_rows(self) -> np.ndarray:
        """Rows not (completely) written yet, int64 ascending: what a resumed extraction must redo."""
        return np.flatnonzero(~self.written_mask()).astype(np.int64)

    def missing_chunks(self) -> list[int]:
        """Chunks with at least one unwritten row: the unit a resumed extraction rewrites."""
        return np.unique(self.missing_rows() // self.chunk_rows).tolist()

    @property
    def complete(self) -> bool:
        return bool(self.group[WRITTEN][:].all())

    def require_complete(self) -> None:
        missing = self.missing_rows()
        if len(missing):
            raise DataError(
                f"{self.path}: {len(missing)} of {self.n} rows are not written (first: "
                f"{', '.join(map(str, missing[:5]))}); resume the extraction first"
            )

    def write_rows(self, start: int, rows: Mapping[str, np.ndarray], index: np.ndarray) -> None:
        """Write rows [start, start + len(index)) of every modality, then mark them written.

        Safe alongside other processes when the range is chunk-aligned (start and stop multiples of
        chunk_rows, or stop == n) and no other process writes those chunks; a partial chunk is a
        read-modify-write of that chunk file.
        """
        index = np.asarray(index)
        count = len(index)
        if set(rows) != set(self.dims):
            raise ConfigError(
                f"{self.path}: write_rows needs the modalities {sorted(self.dims)}, got {sorted(rows)}"
            )
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ConfigError(
                f"{self.path}: index must be a 1-D integer array, got {index.dtype} {index.shape}"
            )
        if start < 0 or start + count > self.n:
            raise ConfigError(f"{self.path}: rows [{start}, {start + count}) outside [0, {self.n})")
        arrays = {}
        for m, x in rows.items():
            x = np.asarray(x)
            if x.shape != (count, self.dims[m]):
                raise ConfigError(
                    f"{self.path}: '{m}' rows have shape {x.shape}, expected ({count}, {self.dims[m]})"
                )
            with np.errstate(over="ignore"):  # beyond float16's range -> inf, which clustering reports
                arrays[m] = x.astype(self.dtype, copy=False)
        if count == 0:
            return
        stop = start + count
        try:
            for m in self.modalities:
                self.group[m][start:stop] = arrays[m]
            self.group[INDEX][start:stop] = index.astype(np.int64, copy=False)
            self._mark_written(start, stop)  # last: a refused write leaves its rows unwritten, to redo
        except OSError as e:
            raise naming(e, self.path) from e

    def _mark_written(self, start: int, stop: int) -> None:
        self.group[WRITTEN][start:stop] = 1


def create_store(
    path: str | os.PathLike,
    n: int,
    dims: Mapping[str, int],
    *,
    dtype: str = "float16",
    attrs: Mapping[str, Any] | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
) -> FeatureStore:
    """Create an empty store for n rows; built under a temporary name and renamed into place.

    An existing `path` is kept unless `overwrite` (then replaced only once the new one is complete).
    """
    path = Path(path)
    dims = {m: int(d) for m, d in dims.items()}
    if n <= 0:
        raise ConfigError(f"{path}: a feature store needs at least one row (n={n})")
    if not dims or set(dims) - set(MODALITIES):
        raise ConfigError(f"{path}: dims must name modalities among {MODALITIES}, got {sorted(dims)}")
    if any(d <= 0 for d in dims.values()):
        raise ConfigError(f"{path}: feature dimensions must be positive, got {dims}")
    if np.dtype(dtype).kind != "f":
        raise ConfigError(f"{path}: feature dtype must be a float type, got {dtype}")
    attrs = dict(attrs or {})
    if clash := _RESERVED & set(attrs):
        raise ConfigError(f"{path}: attrs may not set reserved keys {sorted(clash)}")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (open it to resume, or overwrite it)")
    rows = chunk_rows or chunk_rows_for(n, dims, dtype)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w-", zarr_format=3)
        for m in MODALITIES:
            if m in dims:
                group.create_array(
                    m,
                    shape=(n, dims[m]),
                    chunks=(rows, dims[m]),
                    dtype=dtype,
                    compressors=None,
                    fill_value=0,
                    attributes={"modality": m},
                    dimension_names=("row", "feature"),
                )
        group.create_array(INDEX, shape=(n,), chunks=(rows,), dtype="int64", fill_value=-1)
        group.create_array(WRITTEN, shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
        group.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "n": n,
                "dims": dims,
                "dtype": np.dtype(dtype).name,
                "chunk_rows": rows,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **attrs,
            }
        )
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(path, mode="r+")


def check_new_folder(out: Path, overwrite: bool) -> None:
    """InputError if `out` exists and may not be replaced; callers check before long work, too."""
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (pass --overwrite to replace it)")


def write_folder(out: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Build the folder `out` atomically: `write(tmp)` fills a hidden temp folder beside it, which is
    then renamed into place (an old `out` is removed only after the swap, and only with `overwrite`)."""
    check_new_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale)  # what a killed write of this folder left behind (one writer per folder)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write(tmp)
        _replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, out) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an old `dst` is removed only after the swap."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def open_store(path: str | os.PathLike, mode: str = "r") -> FeatureStore:
    """Open and validate a store: mode "r" to read, "r+" to write rows (resume, other ranks)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no feature store here (not a directory)")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a Zarr v3 group ({type(e).__name__}: {e})") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise DataError(f"{path}: not an xdctools feature store (format attribute {attrs.get('format')!r})")
    if attrs.get("version") != VERSION:
        raise DataError(f"{path}: store version {attrs.get('version')} is not the supported {VERSION}")
    n, dims = int(attrs.get("n", 0)), dict(attrs.get("dims") or {})
    if n <= 0 or not dims:
        raise DataError(f"{path}: empty feature store (n={n}, modalities {sorted(dims)})")
    members = set(group.array_keys())
    expected = {**{m: (n, d) for m, d in dims.items()}, INDEX: (n,), WRITTEN: (n,)}
    for name, shape in expected.items():
        if name not in members:
            raise DataError(f"{path}: array '{name}' is missing")
        actual = tuple(group[name].shape)
        if actual != shape:
            raise DataError(f"{path}: array '{name}' has shape {actual}, expected {shape} (mismatched store)")
    rows = int(attrs["chunk_rows"])
    for name in expected:
        if group[name].chunks[0] != rows:
            raise DataError(f"{path}: array '{name}' is chunked by {group[name].chunks[0]} rows, not {rows}")
    dtype = np.dtype(attrs["dtype"])
    return FeatureStore(path=path, group=group, n=n, dims=dims, dtype=dtype, chunk_rows=rows, attrs=attrs)


def write_rows(store: FeatureStore, start: int, rows: Mapping[str, np.ndarray], index: np.ndarray) -> None:
    """Function form of FeatureStore.write_rows, for callers that pass the store around."""
    store.write_rows(start, rows, index)


class RowWriter:
    """Takes batches of any size, in row order from `start`, and writes whole chunks as they fill.

    An extraction rank writes its `rank_rows` range through one: every write is chunk-aligned, so
    ranks never share a chunk. Leaving the `with` block on an exception drops the unwritten tail
    (those rows stay missing for the resume); leaving it normally writes the tail.
    """

    def __init__(self, store: FeatureStore, start: int, stop: int | None = None) -> None:
        self.store, self.pos, self.stop = store, start, store.n if stop is None else stop
        self._rows: dict[str, list[np.ndarray]] = {m: [] for m in store.modalities}
        self._index: list[np.ndarray] = []
        self._buffered = 0

    def add(self, rows: Mapping[str, np.ndarray], index: np.ndarray) -> None:
        index = np.asarray(index)
        if self.pos + self._buffered + len(index) > self.stop:
            raise ConfigError(
                f"{self.store.path}: {len(index)} more rows would pass the range's end at row {self.stop}"
            )
        if set(rows) != set(self._rows):
            raise ConfigError(
                f"{self.store.path}: rows need the modalities {sorted(self._rows)}, got {sorted(rows)}"
            )
        for m in self._rows:
            self._rows[m].append(np.asarray(rows[m]))
        self._index.append(index)
        self._buffered += len(index)
        boundary = (self.pos + self._buffered) // self.store.chunk_rows * self.store.chunk_rows
        if boundary > self.pos:
            self._flush(boundary - self.pos)

    def _flush(self, count: int) -> None:
        rows = {m: np.concatenate(parts) for m, parts in self._rows.items()}
        index = np.concatenate(self._index)
        self.store.write_rows(self.pos, {m: x[:count] for m, x in rows.items()}, index[:count])
        self._rows = {m: [x[count:]] for m, x in rows.items()}
        self._index = [index[count:]]
        self.pos += count
        self._buffered -= count

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
